"""Turns a results JSON into a Markdown table and a PNG plot.

python -m bench.report bench/results/<run>/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench import compare

_COLUMNS = [
    ("concurrency", "conc", "{}"),
    ("arm", "arm", "{}"),
    ("generator_replicas", "repl", "{}"),
    ("tensor_parallel_size", "TP", "{}"),
    ("requests", "req", "{}"),
    ("failures", "fail", "{}"),
    ("output_tok_s", "out tok/s", "{:,.0f}"),
    ("ttft_ms_p50", "TTFT p50", "{:.1f}"),
    ("ttft_ms_p99", "TTFT p99", "{:.1f}"),
    ("tpot_ms_p50", "TPOT p50", "{:.2f}"),
    ("tpot_ms_p99", "TPOT p99", "{:.2f}"),
    ("itl_ms_p50", "ITL p50", "{:.2f}"),
    ("itl_ms_p99", "ITL p99", "{:.2f}"),
    ("e2e_ms_p50", "E2E p50", "{:,.0f}"),
    ("e2e_ms_p99", "E2E p99", "{:,.0f}"),
    ("tokens_per_message", "tok/msg", "{:.2f}"),
    ("server_ttft_ms_p50", "server TTFT p50", "{:.1f}"),
    ("server_queue_ms_p50", "server queue p50", "{:.1f}"),
    ("client_cpu_ms_per_request", "client CPU ms/req", "{:.2f}"),
    ("client_busiest_cpu_share", "client busiest", "{:.2f}"),
    ("edge_cpu_ms_per_request", "edge CPU ms/req", "{:.3f}"),
    ("prompt_tokens_mean", "prompt tok", "{:.0f}"),
    ("output_tokens_mean", "out tok", "{:.0f}"),
    ("constrained_tokens_mean", "JSON tok", "{:.0f}"),
]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown(results: dict[str, Any]) -> str:
    params = results["params"]
    lines = [
        f"# {results['label']}",
        "",
        f"- command: `{results['command']}`",
        f"- started: {results['started_at']}; device: {results['device']}",
        f"- prompts: {params['prompts']}; TIL prompts: {params.get('til_prompts', '-')}; output:"
        f" {params['output_len']} tokens for every arm but edge-hit (ignore_eos; TIL arms under the edge's"
        f" schema); {params['rounds']} x concurrency requests per level"
        f" (at least {params['min_requests']}), after a warm-up at the same concurrency",
        "- times in ms; TTFT/ITL/E2E measured by the client; TPOT = (E2E - TTFT) / (tokens - 1);"
        " ITL is the gap between text messages (tok/msg tokens each)",
        "",
    ]
    for arm, settings in results.get("engine_settings", {}).items():
        flat = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
        lines.append(f"- engine settings ({arm}): {flat}")
    lines += ["", "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"]
    lines.append("|" + "---|" * len(_COLUMNS))
    for row in results["rows"]:
        shown = {**row, "arm": compare.arm_label(row)}
        lines.append("| " + " | ".join(_cell(shown, key, fmt) for key, _, fmt in _COLUMNS) + " |")
    if any(row.get("client") == "h2load" for row in results["rows"]):
        lines += [
            "",
            "`edge-hit (h2load)`: the same cached request sent by h2load (nghttp2's compiled HTTP/2 load"
            " generator) instead of the Python client processes (`edge-hit`), one call in flight per"
            " connection. Its TTFT and E2E columns are both the time until the stream ended (h2load does not"
            " see single messages): a hit is replayed at once, so this bounds its TTFT from above. `client CPU"
            " ms/req` is h2load's; each call counts only if the edge's metrics counted it OK and a cache hit.",
        ]
    staggered = [row for row in results["rows"] if row.get("arrivals") == "staggered"]
    if staggered:
        lines += [
            "",
            f"`(staggered)` rows: the arm again right after its lockstep row, its {staggered[0]['concurrency']}"
            f" streams started over {staggered[0].get('stagger_s', '?')} s (bench.load.Stagger) so that"
            " requests arrive one by one beside decoding ones instead of in lockstep waves. Each stream's first"
            " and last requests are not measured; out tok/s is over the window when every stream was running;"
            " measured requests inside that window: "
            + ", ".join(f"{compare.arm_label(r)} {r.get('measured_in_full_load', '-')}" for r in staggered)
            + ".",
        ]
    waved = [row for row in results["rows"] if len(row.get("ttft_ms_p50_by_wave") or ()) > 1]
    if waved:
        lines += [
            "",
            "TTFT p50 of each wave (ms): at this concurrency the requests run in lockstep waves, and a wave's"
            " p50 moves by a whole prefill step with how many requests the engine's first step caught"
            " (bench/results/issue13-h200-s21), so compare arms wave by wave too:",
            "",
        ]
        for row in waved:
            per_wave = ", ".join(f"{v:,.1f}" for v in row["ttft_ms_p50_by_wave"])
            lines.append(f"- {compare.arm_label(row)} @ {row['concurrency']}: {per_wave}")
    errors = [row for row in results["rows"] if row.get("errors") or row.get("notes")]
    if errors:
        lines += ["", "Errors and notes:", ""]
        for row in errors:
            lines.append(
                f"- {compare.arm_label(row)} @ {row['concurrency']}: errors {row.get('errors') or {}},"
                f" notes {row.get('notes') or {}}"
            )
    return "\n".join(lines) + "\n" + compare.markdown(results)


def series_name(row: dict[str, Any]) -> str:
    """The arm, with its replicas and tensor parallelism where they are not one."""
    replicas, tp = row.get("generator_replicas") or 1, row.get("tensor_parallel_size") or 1
    return (
        compare.arm_label(row) + (f" x{replicas}" if replicas > 1 else "") + (f" TP={tp}" if tp > 1 else "")
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output_tok_s", "output tokens/s"),
        ("ttft_ms_p50", "TTFT p50 (ms)"),
        ("ttft_ms_p99", "TTFT p99 (ms)"),
        ("tpot_ms_p50", "TPOT p50 (ms)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    series = list(dict.fromkeys(series_name(row) for row in results["rows"]))
    # One colour per series in every panel (a panel that skips a series must not shift the others'),
    # distinct past ten series; staggered rows drawn as squares.
    palette = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    colors = {name: palette(i % palette.N) for i, name in enumerate(series)}
    levels = sorted({row["concurrency"] for row in results["rows"]})
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for name in series:
            # A cache hit replays stored text: its tokens/s and TPOT measure no generation.
            if name.startswith("edge-hit") and key in ("output_tok_s", "tpot_ms_p50"):
                continue
            rows = [r for r in results["rows"] if series_name(r) == name and r.get(key) is not None]
            ax.plot(
                [r["concurrency"] for r in rows],
                [r[key] for r in rows],
                marker="s" if "staggered" in name else "o",
                color=colors[name],
                label=name,
            )
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.set_xscale("symlog", linthresh=16)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes.flat[1].legend()
    fig.suptitle(f"{results['label']} - {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict[str, Any], out_dir: Path, *, with_plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    if not with_plot:
        return
    try:
        plot(results, out_dir / "results.png")
    except ImportError:
        print("matplotlib is not installed: no plot (python -m bench.report results.json makes it later)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="a results.json written by bench.serving")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    (args.results.parent / "results.md").write_text(markdown(results))
    plot(results, args.results.parent / "results.png")
    print(f"wrote {args.results.parent}/results.md and results.png")


if __name__ == "__main__":
    main()
