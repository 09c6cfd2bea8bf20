"""Merges the results of runs made in one machine session (one engine at a time) into one table and
plot, and adds the issue's acceptance ratios.

    python -m bench.combine --label "..." --out bench/results/<name> a/results.json b/results.json ...

Rows keep their arm names; the runs' commands, engine settings and devices are kept side by side.
Ratios and the issues' checks (bench/compare.py) only compare rows that did the same work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import compare
from bench.report import write_all


def combine(label: str, paths: list[Path]) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [{**row, "run": run["label"]} for run in runs for row in run["rows"]]
    rows.sort(
        key=lambda r: (
            r["concurrency"],
            compare.arm_label(r),
            r.get("generator_replicas", 1),
            r.get("tensor_parallel_size", 1),
        )
    )
    settings: dict[str, Any] = {}
    for run in runs:
        for name, values in run.get("engine_settings", {}).items():
            settings[f"{name} ({run['label']})"] = values
    limits = next((run["limits"] for run in runs if run.get("limits")), None)
    return {
        "label": label,
        "command": " ; ".join(run["command"] for run in runs),
        "started_at": min(run["started_at"] for run in runs),
        "device": runs[0]["device"],
        "params": {**runs[0]["params"], "arms": sorted({r["arm"] for r in rows})},
        "engine_settings": settings,
        "rows": rows,
        "ratios": compare.ratios(rows),
        "checks": compare.checks(rows),
        **({"limits": limits} if limits else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("results", type=Path, nargs="+", help="results.json files written by bench.serving")
    args = p.parse_args()
    write_all(combine(args.label, args.results), args.out)
    print(f"wrote {args.out}/results.json, results.md and results.png")


if __name__ == "__main__":
    main()
