"""Like with like: ratios only between rows that did the same work, the issues' acceptance checks, and the
physical limit beside the figures.

Two rows did the same work when their mean output tokens per request agree within 2% and so do their
mean prompt tokens (the plain and TIL workloads are both sized to the same prompt length). A ratio
between rows that did not is not printed: the table says why instead.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

LENGTH_TOLERANCE = 0.02

# Memory bandwidth (TB/s) by the name nvidia-smi reports, for the decode floor.
HBM_TB_S = {"H200": 4.8, "H100 80GB HBM3": 3.35, "H100 NVL": 3.9, "H100 PCIe": 2.0, "A100": 2.0}


def _agree(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


def different_work(
    row: dict[str, Any], ref: dict[str, Any], tolerance: float = LENGTH_TOLERANCE
) -> str | None:
    """Why `row` and `ref` cannot be compared, or None when they did the same work."""
    for key, what in (("output_tokens_mean", "output"), ("prompt_tokens_mean", "prompt")):
        a, b = row.get(key), ref.get(key)
        if a is None or b is None:
            return f"no {what} length for {row['arm'] if a is None else ref['arm']}"
        if not _agree(a, b, tolerance):
            return f"{what} lengths differ: {a:.0f} vs {b:.0f} tokens"
    return None


STAGGERED = " (staggered)"


def arm_label(row: dict[str, Any]) -> str:
    """The arm, with the client that measured it where that is not the arm's own ("edge-hit (h2load)"),
    and " (staggered)" for a row measured with staggered arrivals (bench.load.Stagger)."""
    label = row["arm"] + (f" ({row['client']})" if row.get("client") else "")
    return label + (STAGGERED if row.get("arrivals") == "staggered" else "")


def row_key(row: dict[str, Any]) -> tuple[str, int, int, int]:
    return (
        arm_label(row),
        row["concurrency"],
        int(row.get("generator_replicas") or 1),
        int(row.get("tensor_parallel_size") or 1),
    )


def _index(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int, int, int], dict[str, Any]]:
    return {row_key(r): r for r in rows if "output_tok_s" in r}


@dataclass(frozen=True)
class Ratio:
    what: str
    arm: str
    ref: str
    # "tok/s": arm / ref output tokens per second; "ttft": arm - ref TTFT p50 in ms; "tpot": arm / ref TPOT p50.
    kind: str = "tok/s"


RATIOS = [
    Ratio("D/A output tok/s", "edge", "engine"),
    Ratio("D/A_til output tok/s", "edge", "engine-til"),
    Ratio("D/B_til output tok/s", "edge", "openai-til"),
    Ratio("D/C_til output tok/s (the edge hop)", "edge", "generator-til"),
    Ratio("C_til/A_til output tok/s", "generator-til", "engine-til"),
    Ratio("A_til/A output tok/s (the grammar's cost)", "engine-til", "engine"),
    Ratio("B_til/A_til output tok/s (stock vllm serve)", "openai-til", "engine-til"),
    Ratio("C/A output tok/s", "generator", "engine"),
    Ratio("B/A output tok/s", "openai", "engine"),
    Ratio("D/C_til TPOT p50", "edge", "generator-til", "tpot"),
    Ratio("D - A_til TTFT p50 (ms)", "edge", "engine-til", "ttft"),
    Ratio("D - C_til TTFT p50 (ms)", "edge", "generator-til", "ttft"),
    Ratio("C_til - A_til TTFT p50 (ms)", "generator-til", "engine-til", "ttft"),
    Ratio(
        "A'_til - A_til TTFT p50 (ms) (the generator's prepare)", "engine-wrapper-til", "engine-til", "ttft"
    ),
    Ratio(
        "C_til - A'_til TTFT p50 (ms) (the generator's gRPC hop)",
        "generator-til",
        "engine-wrapper-til",
        "ttft",
    ),
]


def _value(kind: str, row: dict[str, Any], ref: dict[str, Any]) -> float:
    if kind == "tok/s":
        return round(row["output_tok_s"] / ref["output_tok_s"], 3)
    if kind == "tpot":
        return round(row["tpot_ms_p50"] / ref["tpot_ms_p50"], 3)
    return round(row["ttft_ms_p50"] - ref["ttft_ms_p50"], 1)


def ratios(rows: list[dict[str, Any]], specs: list[Ratio] = RATIOS) -> list[dict[str, Any]]:
    """Every ratio whose two rows exist at a concurrency (one replica, TP=1); `value` is None, with
    `note` saying why, where the rows did different work."""
    by = _index(rows)
    levels = sorted({c for _, c, _, _ in by})
    found = []
    # Lockstep rows with lockstep rows, staggered with staggered: the two loads are different work.
    for arrivals in ("", STAGGERED):
        for spec in specs:
            for c in levels:
                row, ref = by.get((spec.arm + arrivals, c, 1, 1)), by.get((spec.ref + arrivals, c, 1, 1))
                if row is None or ref is None:
                    continue
                why = different_work(row, ref)
                found.append(
                    {
                        "what": spec.what + arrivals,
                        "concurrency": c,
                        "value": None if why else _value(spec.kind, row, ref),
                        "note": why or "",
                    }
                )
    return found


@dataclass(frozen=True)
class Check:
    """One acceptance item: `arm`'s `field` against `ref`'s (times `factor`, plus `offset`), or a fixed bound."""

    issue: int
    what: str
    concurrency: int
    arm: str
    field: str
    op: str  # ">=", "<=", "<", or "~=" (within 2%)
    ref: str | None = None
    factor: float = 1.0
    offset: float = 0.0
    arm_replicas: int = 1
    ref_replicas: int = 1
    arm_tp: int = 1
    ref_tp: int = 1


def _within_2_percent(value: float, bound: float) -> bool:
    return abs(value - bound) <= 0.02 * abs(bound)


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
    "~=": _within_2_percent,
}

CHECKS = [
    # The issue states its bounds at 512 prompt tokens; compared rows agree with D within 2% (else n/a).
    Check(13, "D at 512 prompt tokens (within 2%)", 100, "edge", "prompt_tokens_mean", "~=", offset=512.0),
    Check(13, "D at 512 prompt tokens (within 2%)", 1, "edge", "prompt_tokens_mean", "~=", offset=512.0),
    Check(13, "D output tok/s >= 0.90 x A", 100, "edge", "output_tok_s", ">=", "engine", factor=0.90),
    Check(13, "D TPOT p50 <= 1.10 x C_til's", 100, "edge", "tpot_ms_p50", "<=", "generator-til", factor=1.10),
    Check(13, "D TTFT p50 <= A_til's + 10 ms", 100, "edge", "ttft_ms_p50", "<=", "engine-til", offset=10.0),
    Check(13, "D output tok/s >= 1.5 x B_til", 100, "edge", "output_tok_s", ">=", "openai-til", factor=1.5),
    # The same bounds with staggered arrivals (bench.load.Stagger), where a wave's prefill-step lottery
    # does not decide the TTFT p50s.
    *(
        Check(13, what + STAGGERED, 100, arm + STAGGERED, field, op, ref + STAGGERED, factor, offset)
        for what, arm, field, op, ref, factor, offset in (
            ("D output tok/s >= 0.90 x A", "edge", "output_tok_s", ">=", "engine", 0.90, 0.0),
            ("D TPOT p50 <= 1.10 x C_til's", "edge", "tpot_ms_p50", "<=", "generator-til", 1.10, 0.0),
            ("D TTFT p50 <= A_til's + 10 ms", "edge", "ttft_ms_p50", "<=", "engine-til", 1.0, 10.0),
        )
    ),
    Check(13, "D TTFT p50 <= A_til's + 5 ms", 1, "edge", "ttft_ms_p50", "<=", "engine-til", offset=5.0),
    Check(13, "E TTFT p50 <= 5 ms", 100, "edge-hit", "ttft_ms_p50", "<=", offset=5.0),
    Check(13, "E TTFT p99 <= 15 ms", 100, "edge-hit", "ttft_ms_p99", "<=", offset=15.0),
    # h2load's row times the end of each stream, which bounds a hit's TTFT from above.
    Check(
        13, "E end of stream p50 <= 5 ms (h2load)", 100, "edge-hit (h2load)", "ttft_ms_p50", "<=", offset=5.0
    ),
    Check(
        13,
        "E end of stream p99 <= 15 ms (h2load)",
        100,
        "edge-hit (h2load)",
        "ttft_ms_p99",
        "<=",
        offset=15.0,
    ),
    Check(
        14,
        "2 replicas behind one edge >= 1.9 x 1 replica, output tok/s",
        200,
        "edge",
        "output_tok_s",
        ">=",
        "edge",
        factor=1.9,
        arm_replicas=2,
    ),
    Check(14, "TP=2 TPOT p50 < TP=1's (through the edge)", 1, "edge", "tpot_ms_p50", "<", "edge", arm_tp=2),
]


def checks(rows: list[dict[str, Any]], specs: list[Check] = CHECKS) -> list[dict[str, Any]]:
    """Each acceptance item the rows can answer: met (True/False), or None with a note where the rows
    did different work."""
    by = _index(rows)
    found = []
    for spec in specs:
        row = by.get((spec.arm, spec.concurrency, spec.arm_replicas, spec.arm_tp))
        ref = None
        if spec.ref is not None:
            ref = by.get((spec.ref, spec.concurrency, spec.ref_replicas, spec.ref_tp))
            if ref is None:
                continue
        if row is None or spec.field not in row:
            continue
        value = row[spec.field]
        bound = spec.offset if ref is None else ref[spec.field] * spec.factor + spec.offset
        why = different_work(row, ref) if ref is not None else None
        found.append(
            {
                "issue": spec.issue,
                "what": spec.what,
                "concurrency": spec.concurrency,
                "value": value,
                "bound": round(bound, 2),
                "met": None if why else bool(_OPS[spec.op](value, bound)),
                "note": why or "",
            }
        )
    return found


def hbm_tb_s(device: str) -> float | None:
    """The memory bandwidth of the device nvidia-smi named, if known."""
    for name, tb_s in HBM_TB_S.items():
        if name in device:
            return tb_s
    return None


def model_bytes(config: dict[str, Any], bytes_per_param: int = 2) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes per token) of a Llama-shaped Hugging Face config."""
    hidden = config["hidden_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    per_layer = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2 + 3 * hidden * inter
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embeddings
    kv_per_token = 2 * layers * kv_heads * head_dim * bytes_per_param
    return float(params * bytes_per_param), float(kv_per_token)


def decode_floor(
    weight_bytes: float, kv_bytes_per_token: float, tb_s: float, concurrency: int, context_tokens: float
) -> dict[str, float]:
    """The HBM-bandwidth bound on decode: each step reads the weights once and every stream's KV cache."""
    step_bytes = weight_bytes + concurrency * context_tokens * kv_bytes_per_token
    step_s = step_bytes / (tb_s * 1e12)
    return {
        "concurrency": concurrency,
        "tpot_ms_min": round(step_s * 1e3, 2),
        "output_tok_s_max": round(concurrency / step_s, 0),
    }


def limits(
    config: dict[str, Any], device: str, levels: list[int], prompt_tokens: int, output_tokens: int
) -> dict[str, Any] | None:
    """The decode floor at each level, with what it assumes; None for an unknown device."""
    tb_s = hbm_tb_s(device)
    if tb_s is None:
        return None
    weights, kv = model_bytes(config)
    # A stream's mean context while it decodes: the prompt plus half the output.
    context = prompt_tokens + output_tokens / 2
    return {
        "hbm_tb_s": tb_s,
        "weight_gb": round(weights / 1e9, 2),
        "kv_kb_per_token": round(kv / 1e3, 1),
        "mean_context_tokens": context,
        "levels": [decode_floor(weights, kv, tb_s, c, context) for c in levels],
    }


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The ratio, check and limit sections of a results file, as Markdown."""
    lines: list[str] = []
    if limit := results.get("limits"):
        lines += [
            "",
            "## The physical limit",
            "",
            f"Decode is bound by HBM bandwidth: every step reads the weights ({limit['weight_gb']} GB in bf16) "
            f"and each stream's KV cache ({limit['kv_kb_per_token']} KB per token, {limit['mean_context_tokens']:.0f} "
            f"tokens of context on average) at {limit['hbm_tb_s']} TB/s.",
            "",
            "| conc | TPOT floor ms | output tok/s ceiling |",
            "|---|---|---|",
        ]
        lines += [
            f"| {lv['concurrency']} | {lv['tpot_ms_min']} | {lv['output_tok_s_max']:,.0f} |"
            for lv in limit["levels"]
        ]
    if results.get("ratios"):
        lines += ["", "## Ratios (only between rows that did the same work)", "", "| what | conc | value |"]
        lines.append("|---|---|---|")
        for r in results["ratios"]:
            shown = _fmt(r["value"]) if r["value"] is not None else f"n/a ({r['note']})"
            lines.append(f"| {r['what']} | {r['concurrency']} | {shown} |")
    if results.get("checks"):
        lines += [
            "",
            "## Done-when items",
            "",
            "| issue | item | conc | value | bound | met |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["checks"]:
            met = {True: "yes", False: "**no**", None: f"n/a ({c['note']})"}[c["met"]]
            lines.append(
                f"| {c['issue']} | {c['what']} | {c['concurrency']} | {_fmt(c['value'])} | {_fmt(c['bound'])} | {met} |"
            )
    return "\n".join(lines) + ("\n" if lines else "")
