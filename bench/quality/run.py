"""The origin document's model table, for any model: TILs for a corpus of real diffs through the real stack.

    python -m bench.quality.run --model smollm2=packaged --model gemma=/path/gemma-3-270m.gguf \\
        --limit 32 --max-tokens 512 --out bench/results/quality

For each model, the four services start as local processes (`services.stack.LocalStack`, the generator on
that GGUF) and every diff of the corpus goes through `EdgeService/GenerateTil` (cache bypassed, greedy).
Each `--sampling NAME:key=value,...` is one more pass with those SamplingParams (for example
`off:repetition_penalty=1,frequency_penalty=0,presence_penalty=0` against the server's defaults).
Per (model, sampling) row: prompt and output tokens/s (from the edge's timings), the generator's peak RSS
(VmHWM), and quality: streams finished (STOP), JSON parsed, the document contract met (no enforced
violation, checked again here with the diff), bullets whose code block quotes only diff lines, Hangul share of
the prose, repeated word-3-gram rate, share of the diff's top identifiers the TIL names, and titles or
keywords that repeat a word. Writes `<out>/<label>.json` per row as it goes and `<out>/table.md` (+ `.json`)
from every row in `<out>`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from til.v1 import common_pb2, edge_pb2, edge_pb2_grpc

from services.edge.diffs import changed_files, changed_identifiers, guess_language, quotable_lines
from services.edge.til_format import check_til, prose, repeated_phrase, title_prefix
from services.stack import SERVICES, LocalStack, free_port

DATE = "2026-11-29"
_HANGUL = re.compile("[가-힣]")
_WORDS = re.compile(r"\S+")
_ITEM = re.compile(r"^- (.*)\n```[^\n]*\n(.*?)```", re.MULTILINE | re.DOTALL)
_BULLET = re.compile(r"^[-*+] ", re.MULTILINE)


def load_corpus(path: Path, limit: int | None) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit] if limit else rows


def hangul_share(text: str) -> float:
    letters = [c for c in text if not c.isspace()]
    return sum(1 for c in letters if _HANGUL.match(c)) / len(letters) if letters else 0.0


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    words = _WORDS.findall(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def quoted_bullets(content: str, diff: str) -> tuple[int, int]:
    """(bullets followed by a code block that quotes only lines of the diff, bullets)."""
    lines = {line.lstrip(" \t") for line in quotable_lines(diff, max_lines=10**6, max_bytes=10**9)}
    good = 0
    for item in _ITEM.finditer(content):
        body = [line.lstrip(" \t") for line in item.group(2).split("\n") if line.strip()]
        good += bool(body) and all(line in lines for line in body)
    return good, len(_BULLET.findall(content))


def title_or_keyword_repeat(document: dict[str, Any]) -> str | None:
    """What repeats in the title (after its prefix) or the keywords: a word twice in one of them, a word that is
    one run over again ("해당해당"), or a keyword twice (case aside); None when nothing does."""
    title = document.get("title")
    title = title if isinstance(title, str) else ""
    listed = document.get("keywords")
    keywords = [k for k in listed if isinstance(k, str)] if isinstance(listed, list) else []
    for text in [title.removeprefix(title_prefix(DATE)), *keywords]:
        again = repeated_phrase(text)
        if again:
            return again
    folded = [k.strip().lower() for k in keywords]
    return next((k for i, k in enumerate(folded) if k in folded[:i]), None)


def score(row: dict[str, str], finished: edge_pb2.TilFinished | None) -> dict[str, Any]:
    result: dict[str, Any] = {"id": row["id"], "finished": False, "parsed": False, "contract": False}
    if finished is None:
        return result
    result["finished"] = finished.finish_reason == common_pb2.FINISH_REASON_STOP
    result["finish_reason"] = common_pb2.FinishReason.Name(finished.finish_reason)
    result["prompt_tokens"] = finished.usage.prompt_tokens
    result["completion_tokens"] = finished.usage.completion_tokens
    ttft = finished.timings.time_to_first_token_ms / 1000
    total = finished.timings.total_ms / 1000
    result["ttft_s"], result["total_s"] = ttft, total
    try:
        document = json.loads(finished.til_json)
    except ValueError:
        return result
    result["parsed"] = isinstance(document, dict)
    if not result["parsed"]:
        return result
    language = guess_language(changed_files(row["diff"]))
    broken = check_til(
        document,
        date=DATE,
        truncated=not result["finished"],
        diff=row["diff"],
        language=language,
    )
    result["violations"] = [v.message for v in broken]
    result["contract"] = not any(v.enforced for v in broken)
    result["repeats"] = title_or_keyword_repeat(document)
    content = document.get("content") if isinstance(document.get("content"), str) else ""
    title = document.get("title") if isinstance(document.get("title"), str) else ""
    text = f"{title}\n{prose(content)}"
    result["quoted_bullets"], result["bullets"] = quoted_bullets(content, row["diff"])
    result["hangul"] = hangul_share(prose(content).replace(f"# {DATE} TIL", ""))
    result["repeated_3grams"] = repeated_ngram_rate(text)
    names = changed_identifiers(row["diff"], limit=10)
    whole = f"{title}\n{content}"
    result["identifiers_named"] = sum(1 for n in names if n in whole) / len(names) if names else 0.0
    result["til"] = document
    return result


async def one_til(
    stub: edge_pb2_grpc.EdgeServiceStub,
    row: dict[str, str],
    args: argparse.Namespace,
    sampling: dict[str, float],
) -> edge_pb2.TilFinished | None:
    request = edge_pb2.GenerateTilRequest(
        diff=row["diff"],
        commit_messages=[row["subject"]],
        date=DATE,
        generation=edge_pb2.GenerationOverrides(
            max_tokens=args.max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0, seed=0, **sampling),
        ),
        cache_policy=edge_pb2.CACHE_POLICY_BYPASS,
    )
    finished = None
    async for message in stub.GenerateTil(request, timeout=args.timeout_s):
        if message.WhichOneof("event") == "finished":
            finished = message.finished
    return finished


class VramPeak:
    """The most GPU memory in use (nvidia-smi, all processes: the generator's engine core is a child of it)
    seen since start, sampled every `interval_s` on a thread, and what was in use before (another engine's)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak_mib = self.baseline_mib = 0.0
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def used_mib() -> float:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return float(sum(float(line) for line in out.split()))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.used_mib())
            self._stop.wait(self._interval_s)

    def __enter__(self) -> VramPeak:
        self.peak_mib = self.baseline_mib = self.used_mib()  # fails here, before any work, without nvidia-smi
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def service_env(items: list[str], services: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """`--env` items routed by prefix: EDGE_X=1 goes to the edge."""
    env: dict[str, dict[str, str]] = {name: {} for name in services}
    for item in items:
        key, sep, value = item.partition("=")
        service = key.split("_", 1)[0].lower()
        if not sep or service not in env:
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE, NAME starting with one of {services}")
        env[service][key] = value
    return env


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def summarize(
    label: str,
    model: str,
    sampling: dict[str, float],
    scores: list[dict[str, Any]],
    rss: float,
    info: dict[str, Any],
) -> dict[str, Any]:
    n = len(scores)
    done = [s for s in scores if "prompt_tokens" in s]
    parsed = [s for s in scores if s["parsed"]]

    def mean(key: str, rows: list[dict[str, Any]]) -> float | None:
        values = [s[key] for s in rows if key in s]
        return round(statistics.fmean(values), 4) if values else None

    prompt_rate = [s["prompt_tokens"] / s["ttft_s"] for s in done if s["ttft_s"] > 0]
    output_rate = [
        s["completion_tokens"] / (s["total_s"] - s["ttft_s"]) for s in done if s["total_s"] > s["ttft_s"]
    ]
    bullets = sum(s.get("bullets", 0) for s in parsed)
    return {
        "label": label,
        "model": model,
        "sampling": sampling or "server defaults",
        "diffs": n,
        "prompt_tok_s": round(statistics.median(prompt_rate), 1) if prompt_rate else None,
        "output_tok_s": round(statistics.median(output_rate), 1) if output_rate else None,
        "peak_rss_mib": round(rss, 0),
        "finished": sum(s["finished"] for s in scores),
        "parsed": len(parsed),
        "contract": sum(s["contract"] for s in scores),
        "bullets": bullets,
        "quoted_bullets": sum(s.get("quoted_bullets", 0) for s in parsed),
        "hangul_share": mean("hangul", parsed),
        "repeated_3gram_rate": mean("repeated_3grams", parsed),
        "identifiers_named": mean("identifiers_named", parsed),
        "title_or_keyword_repeats": sum(bool(s.get("repeats")) for s in parsed),
        "mean_completion_tokens": mean("completion_tokens", done),
        "generator": info,
        "rows": scores,
    }


def write_table(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "table.json"]
    rows = [r for r in rows if isinstance(r, dict) and "diffs" in r]  # model runs only
    header = (
        "| run | model | sampling | diffs | prompt tok/s | output tok/s | peak memory MiB | finished | JSON parsed "
        "| contract met | bullets with quoted code | Hangul share of prose | repeated 3-gram rate "
        "| diff identifiers named | titles/keywords repeating a word | output tokens (mean) |\n"
        + "|---" * 16
        + "|\n"
    )
    lines = []
    for r in rows:
        n = r["diffs"]
        sampling = (
            r["sampling"]
            if isinstance(r["sampling"], str)
            else ", ".join(f"{k}={v}" for k, v in r["sampling"].items())
        )
        lines.append(
            f"| {r['label']} | {r['model']} | {sampling} | {n} | {r['prompt_tok_s']} | {r['output_tok_s']} "
            f"| {r['peak_rss_mib']:.0f}{' GPU' if r.get('memory', '').startswith('peak GPU') else ' RSS'} "
            f"| {r['finished']}/{n} | {r['parsed']}/{n} | {r['contract']}/{n} "
            f"| {r['quoted_bullets']}/{r['bullets']} | {r['hangul_share']} | {r['repeated_3gram_rate']} "
            f"| {r['identifiers_named']} | {r['title_or_keyword_repeats']} | {r['mean_completion_tokens']} |"
        )
    (out / "table.md").write_text(
        "# TIL quality by model\n\n"
        "Corpus: `bench/quality/corpus.jsonl.gz` (see `bench/quality/SOURCES.md`). Made with:\n\n"
        + "\n".join(sorted({f"    {r.get('command', '')}" for r in rows}))
        + "\n\n"
        + header
        + "\n".join(lines)
        + "\n"
    )
    (out / "table.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "rows"} for r in rows], ensure_ascii=False, indent=1)
    )


async def run_model(
    name: str,
    path: str,
    args: argparse.Namespace,
    passes: list[tuple[str, dict[str, float]]],
    corpus: list[dict[str, str]],
) -> None:
    services = tuple(s for s in SERVICES if s in args.services.split(","))
    env = service_env(args.env, services)
    generator_env = {
        "GENERATOR_MAX_MODEL_LEN": str(args.context),
        **dict(kv.split("=", 1) for kv in args.generator_env),
        **env["generator"],
    }
    if path != "packaged":
        generator_env["GENERATOR_MODEL"] = path
    edge_env = {"EDGE_DEFAULT_MAX_TOKENS": str(args.max_tokens), **env["edge"]}
    if "retriever" not in services:
        edge_env.setdefault("EDGE_RETRIEVAL_TOP_K", "0")
    env.update(generator=generator_env, edge=edge_env)
    vram = VramPeak() if args.memory == "vram" else contextlib.nullcontext()
    data_dir = (
        contextlib.nullcontext(str(args.data))
        if args.data
        else tempfile.TemporaryDirectory(prefix="til-quality-")
    )
    with data_dir as data, vram:
        ports = {n: free_port() for n in SERVICES}  # the edge is told every peer's address
        stack = LocalStack(
            Path(data),
            ports=ports,
            metrics_ports={n: free_port() for n in SERVICES},
            env=env,
            services=services,
        )
        print(f"[{name}] starting the stack ({path}): {', '.join(services)}", file=sys.stderr, flush=True)
        await stack.start(
            timeout_s=args.start_timeout_s,
            progress=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True),
        )
        try:
            gen_pid = stack.processes["generator"].process.pid  # type: ignore[union-attr]
            async with grpc.aio.insecure_channel(stack.address("edge")) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                for label, sampling in passes:
                    run_label = f"{name}-{label}"
                    scores: list[dict[str, Any]] = []
                    saved = args.out / f"{run_label}.json"
                    if args.resume and saved.exists():  # keep what an interrupted run measured
                        scores = json.loads(saved.read_text())["rows"]
                    done = {s["id"] for s in scores}
                    began = time.monotonic()
                    for i, row in enumerate(corpus, 1):
                        if row["id"] in done:
                            continue
                        try:
                            finished = await one_til(stub, row, args, sampling)
                            scored = score(row, finished)
                        except grpc.aio.AioRpcError as exc:
                            scored = {
                                "id": row["id"],
                                "finished": False,
                                "parsed": False,
                                "contract": False,
                                "error": f"{exc.code().name}: {exc.details()}",
                            }
                        scores.append(scored)
                        elapsed = time.monotonic() - began
                        fresh = len(scores) - len(done)
                        eta = elapsed / fresh * (len(corpus) - len(scores))
                        print(
                            f"[{run_label}] {i}/{len(corpus)} {row['id']} finished={scored['finished']} "
                            f"contract={scored['contract']} tokens={scored.get('completion_tokens', '-')} "
                            f"{scored.get('error', '')} elapsed {elapsed:.0f}s eta {eta:.0f}s",
                            file=sys.stderr,
                            flush=True,
                        )
                        memory = (
                            vram.peak_mib - vram.baseline_mib
                            if isinstance(vram, VramPeak)
                            else peak_rss_mib(gen_pid)
                        )
                        summary = summarize(
                            run_label,
                            name,
                            sampling,
                            scores,
                            memory,
                            {"path": path, **generator_env},
                        )
                        summary["memory"] = (
                            f"peak GPU memory in use (nvidia-smi) above the {vram.baseline_mib:.0f} MiB in use before"
                            if isinstance(vram, VramPeak)
                            else "peak RSS"
                        )
                        summary["command"] = args.command
                        summary["complete"] = len(scores) == len(corpus)
                        (args.out / f"{run_label}.json").write_text(
                            json.dumps(summary, ensure_ascii=False, indent=1)
                        )
                        write_table(args.out)
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", default=[], help="NAME=GGUF path, or NAME=packaged")
    parser.add_argument(
        "--table-only", action="store_true", help="only write the table from the rows in --out"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="the stack's data and logs (default: a temporary one)"
    )
    parser.add_argument(
        "--sampling", action="append", default=[], help="NAME:key=value,... (default: server defaults only)"
    )
    parser.add_argument("--corpus", type=Path, default=Path(__file__).with_name("corpus.jsonl.gz"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0, help="for each service to be SERVING")
    parser.add_argument("--generator-env", action="append", default=[], help="KEY=VALUE for the generator")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="SERVICE_KEY=VALUE for the service its prefix names (EDGE_...)",
    )
    parser.add_argument(
        "--services",
        default=",".join(SERVICES),
        help="services to start (without the retriever the edge writes without related TILs)",
    )
    parser.add_argument(
        "--memory",
        choices=("rss", "vram"),
        default="rss",
        help="the generator's peak RSS, or the GPU's peak memory in use (nvidia-smi, sampled) for vLLM",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument("--resume", action="store_true", help="keep the rows an earlier run of a label wrote")
    args = parser.parse_args(argv)
    args.command = "python -m bench.quality.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        write_table(args.out)
        print((args.out / "table.md").read_text())
        return 0
    if not args.model:
        parser.error("--model is required (or --table-only)")
    passes: list[tuple[str, dict[str, float]]] = []
    for spec in args.sampling:
        label, _, pairs = spec.partition(":")
        passes.append((label, {k: float(v) for k, v in (p.split("=", 1) for p in pairs.split(",") if p)}))
    if not passes:
        passes = [("defaults", {})]
    corpus = load_corpus(args.corpus, args.limit)
    for spec in args.model:
        name, _, path = spec.partition("=")
        asyncio.run(run_model(name, path or "packaged", args, passes, corpus))
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
