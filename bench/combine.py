"""Merges the results of runs made in one machine session (one engine at a time) into one table and
plot, and adds the issue's acceptance ratios.

    python -m bench.combine --label "..." --out bench/results/<name> a/results.json b/results.json ...

Rows keep their arm names; the runs' commands, engine settings and devices are kept side by side.
The ratios compare arms at one concurrency: output tokens/s as a ratio, TTFT p50 as a difference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import markdown, write_all

# (what, arm, reference arm): the "done when" items, plus D against its own workload's A and B.
RATIOS = [
    ("C/A output tok/s (>= 0.98)", "generator", "engine"),
    ("D/A output tok/s (>= 0.97), A with the same TIL prompt and schema", "edge", "engine-til"),
    ("D/A output tok/s, A with the plain workload (not like for like)", "edge", "engine"),
    ("C_til/A_til output tok/s", "generator-til", "engine-til"),
    ("D/C_til output tok/s (the edge hop alone)", "edge", "generator-til"),
    ("B/A output tok/s (vllm serve against its engine)", "openai", "engine"),
    ("C/B output tok/s", "generator", "openai"),
    ("D/B_til output tok/s (D >= B, like for like)", "edge", "openai-til"),
]
TTFT_DIFFS = [
    ("D - A_til TTFT p50 (within 5 ms)", "edge", "engine-til"),
    ("C_til - A_til TTFT p50", "generator-til", "engine-til"),
    ("D - C_til TTFT p50 (the edge hop alone)", "edge", "generator-til"),
    ("C - A TTFT p50", "generator", "engine"),
    ("B - A TTFT p50", "openai", "engine"),
    ("D - B_til TTFT p50", "edge", "openai-til"),
]


def combine(label: str, paths: list[Path]) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [{**row, "run": run["label"]} for run in runs for row in run["rows"]]
    rows.sort(key=lambda r: (r["concurrency"], r["arm"]))
    settings: dict[str, Any] = {}
    for run in runs:
        for name, values in run.get("engine_settings", {}).items():
            settings[f"{name} ({run['label']})"] = values
    return {
        "label": label,
        "command": " ; ".join(run["command"] for run in runs),
        "started_at": min(run["started_at"] for run in runs),
        "device": runs[0]["device"],
        "params": {**runs[0]["params"], "arms": sorted({r["arm"] for r in rows})},
        "engine_settings": settings,
        "rows": rows,
        "ratios": ratios(rows),
    }


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["arm"], r["concurrency"]): r for r in rows if "output_tok_s" in r}
    levels = sorted({c for _, c in by})
    found = []
    for what, arm, ref in RATIOS:
        for c in levels:
            if (arm, c) in by and (ref, c) in by:
                value = by[(arm, c)]["output_tok_s"] / by[(ref, c)]["output_tok_s"]
                found.append({"what": what, "concurrency": c, "value": round(value, 3)})
    for what, arm, ref in TTFT_DIFFS:
        for c in levels:
            if (arm, c) in by and (ref, c) in by:
                value = by[(arm, c)]["ttft_ms_p50"] - by[(ref, c)]["ttft_ms_p50"]
                found.append({"what": what, "concurrency": c, "value": round(value, 1)})
    return found


def ratio_table(results: dict[str, Any]) -> str:
    lines = ["", "## Ratios", "", "| what | conc | value |", "|---|---|---|"]
    lines += [f"| {r['what']} | {r['concurrency']} | {r['value']} |" for r in results["ratios"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("results", type=Path, nargs="+", help="results.json files written by bench.serving")
    args = p.parse_args()
    results = combine(args.label, args.results)
    write_all(results, args.out)
    (args.out / "results.md").write_text(markdown(results) + ratio_table(results))
    print(f"wrote {args.out}/results.json, results.md and results.png")


if __name__ == "__main__":
    main()
