"""Serving benchmark: arms x concurrency levels, each level warmed up before it is measured.

In-process arms (`engine`, `engine-wrapper`) build one vLLM engine here from the engine flags;
network arms talk to servers started beforehand (see bench/README.md and bench/run_gpu.sh).

    python -m bench.serving --arms engine,engine-wrapper \\
        --model /tmp/vkit_models/llama3-8b-shape-smollm2-tok-dummy --load-format dummy \\
        --concurrency 1,16,64,100,128 --input-len 512 --output-len 256 --out bench/results/8b-dummy

Writes results.json, results.md and results.png into --out, the JSON and table after every row.

`--hit-client h2load` (or `both`) measures the `edge-hit` arm with h2load (bench/h2grpc.py), a compiled
HTTP/2 client, instead of (or besides) the Python client processes: its row says `client: h2load`, and
its TTFT and E2E are both the time to the end of each stream (a hit is replayed at once, so this bounds
the TTFT from above). The edge's metrics (`--edge-metrics`, the first worker's) must count every call
h2load sent as OK and answered from the cache.

`--stagger-s S` measures each arm of `--staggered-arms` once more at every level above 1, right after its
lockstep row, with staggered arrivals (bench.load.Stagger): its streams start spread over S seconds
and keep their spacing, each stream's first and last requests are not measured, and the row (arm
label "ARM (staggered)") gives the throughput of the window in which every stream was running. Its
ratios and checks compare staggered rows only with staggered rows.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import compare, h2grpc
from bench.arms import (
    ALL_ARMS,
    IN_PROCESS,
    NETWORK,
    TIL_ARMS,
    Arm,
    ArmSpec,
    EdgeArm,
    EngineArm,
    EngineTilArm,
    EngineWrapperArm,
    EngineWrapperTilArm,
    network_arm,
)
from bench.load import ClientProcesses, Stagger, Ticker, closed_loop, default_client_processes, staggered_loop
from bench.metrics import RequestRecord, summarize
from bench.prompts import Prompt, PromptFactory, PromptPool, load_dataset
from bench.report import write_all
from bench.til_workload import TilPool


@dataclass(frozen=True)
class EngineSettings:
    """The in-process engine's settings: the fields of `GeneratorSettings` that vLLM reads."""

    model: str
    model_id: str
    tokenizer: str | None
    max_model_len: int | None
    default_max_tokens: int
    dtype: str
    gpu_memory_utilization: float
    tensor_parallel_size: int
    quantization: str | None
    max_num_seqs: int | None
    enable_prefix_caching: bool | None
    seed: int | None
    load_format: str
    trust_remote_code: bool
    # GENERATOR_STRUCTURED_OUTPUT_PARALLEL_*: None keeps vLLM's own choice.
    structured_output_parallel_threshold: int | None = None
    structured_output_parallel_workers: int | None = None
    structured_output_parallel_batch_size: int | None = None
    structured_output_fill: str | None = None
    schema_compile_timeout_s: float = 10.0  # GENERATOR_SCHEMA_COMPILE_TIMEOUT_S
    schema_workers: int = 0  # GENERATOR_SCHEMA_WORKERS: the in-process arms hand vLLM prepared schemas
    stream_interval: int | None = None  # GENERATOR_STREAM_INTERVAL


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", required=True, help=f"comma-separated, from: {', '.join(ALL_ARMS)}")
    p.add_argument("--concurrency", default="1,16,64,100,128", help="comma-separated levels")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (exact) when no --dataset")
    p.add_argument("--output-len", type=int, default=256, help="output tokens of every arm (ignore_eos)")
    p.add_argument(
        "--til-input-len",
        type=int,
        default=512,
        help="TIL arms: diffs sized so that the edge's chat prompt has this many tokens",
    )
    p.add_argument(
        "--dataset", type=Path, help='JSON Lines of {"prompt": ...} instead of fixed-length prompts'
    )
    p.add_argument("--rounds", type=int, default=2, help="measured requests per level = rounds x concurrency")
    p.add_argument("--min-requests", type=int, default=8, help="measured requests per level at least")
    p.add_argument("--warmup-output-len", type=int, default=32, help="output tokens of warm-up requests")
    p.add_argument(
        "--stagger-s",
        type=float,
        default=0.0,
        help="also measure --staggered-arms at levels above 1 with streams started over this many seconds "
        "(at most a request's duration; 0: lockstep rows only)",
    )
    p.add_argument(
        "--staggered-arms",
        default="engine,engine-til,generator-til,edge",
        help="comma-separated arms that --stagger-s measures again (those of --arms)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt generator seed")
    p.add_argument("--label", default="serving", help="title of the results")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json/.md/.png")

    g = p.add_argument_group("network arms")
    g.add_argument("--generator-addr", default="127.0.0.1:50052")
    g.add_argument("--edge-addr", default="127.0.0.1:50051")
    g.add_argument("--cacher-addr", default="127.0.0.1:50054", help="edge-hit: the edge's cacher, to seed")
    g.add_argument("--openai-url", default="http://127.0.0.1:8000")
    g.add_argument("--openai-model", default="", help="served model name (default: --model-id)")
    g.add_argument(
        "--generator-replicas",
        type=int,
        default=1,
        help="generator processes behind the edge (recorded in the edge arms' rows)",
    )
    g.add_argument(
        "--hbm-tb-s",
        type=float,
        default=None,
        help="memory bandwidth for the decode floor (default: by device)",
    )
    g.add_argument(
        "--hit-client",
        choices=("python", "h2load", "both"),
        default="python",
        help="edge-hit: the Python client processes, h2load (a row with client h2load), or both rows",
    )
    g.add_argument(
        "--edge-metrics",
        default="127.0.0.1:9091",
        help="h2load edge-hit: the first edge worker's metrics HOST:PORT (worker i: PORT + i)",
    )
    g.add_argument(
        "--edge-workers",
        type=int,
        default=0,
        help="h2load edge-hit: edge workers to read metrics from (0: the consecutive ports that answer)",
    )
    g.add_argument(
        "--h2load-rounds",
        type=int,
        default=50,
        help="h2load edge-hit: measured requests per level = rounds x concurrency",
    )
    g.add_argument("--h2load-threads", type=int, default=None, help="h2load threads (default min(4, CPUs))")
    g.add_argument(
        "--client-procs",
        type=int,
        default=default_client_processes(),
        help="client processes for network arms (1 = in the driver's loop)",
    )

    e = p.add_argument_group("engine (in-process arms; tokenizer for every arm)")
    e.add_argument("--model", required=True, help="HF model folder (or the tokenizer's, for network arms)")
    e.add_argument("--model-id", default="", help="served model name (default: the folder's name)")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--max-model-len", type=int, default=4096)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--quantization", default=None)
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--engine-seed", type=int, default=0)
    e.add_argument("--load-format", default="auto", help='"dummy": random weights, real speed')
    e.add_argument(
        "--stream-interval",
        type=_at_least_one,
        default=None,
        help="vLLM's tokens a message after the first (GENERATOR_STREAM_INTERVAL)",
    )
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument(
        "--bitmask-parallel-threshold",
        type=int,
        default=None,
        help="GENERATOR_STRUCTURED_OUTPUT_PARALLEL_THRESHOLD for the in-process engine (tilserve's vLLM plugin)",
    )
    e.add_argument("--bitmask-parallel-workers", type=int, default=None)
    e.add_argument("--bitmask-parallel-batch-size", type=int, default=None)
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ALL_ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; choose from {', '.join(ALL_ARMS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.staggered_arms = [a.strip() for a in args.staggered_arms.split(",") if a.strip()]
    if args.stagger_s < 0:
        p.error("--stagger-s must be 0 or more")
    if "edge-hit" in args.staggered_arms:
        p.error("--staggered-arms: edge-hit replays a cached result at once; there is nothing to stagger")
    if args.hit_client != "python":
        if "edge-hit" not in args.arms:
            p.error("--hit-client applies to the edge-hit arm, which --arms does not name")
        try:
            h2grpc.find_h2load()
        except h2grpc.H2loadMissing as exc:
            p.error(str(exc))
    args.model_id = args.model_id or Path(args.model).name
    args.openai_model = args.openai_model or args.model_id
    return args


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        model=args.model,
        model_id=args.model_id,
        tokenizer=args.tokenizer,
        max_model_len=args.max_model_len,
        default_max_tokens=args.output_len,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.engine_seed,
        stream_interval=args.stream_interval,
        load_format=args.load_format,
        trust_remote_code=args.trust_remote_code,
        structured_output_parallel_threshold=args.bitmask_parallel_threshold,
        structured_output_parallel_workers=args.bitmask_parallel_workers,
        structured_output_parallel_batch_size=args.bitmask_parallel_batch_size,
    )


def device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError):
        return "no GPU visible"


def command_line() -> str:
    env = " ".join(
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith(("VLLM_", "CUDA_VISIBLE"))
    )
    return (env + " " if env else "") + "python -m bench.serving " + shlex.join(sys.argv[1:])


H2LOAD = "h2load"


def arm_runs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(arm, client) in `--arms` order: client None for an arm's own client, "h2load" for the edge-hit
    row that h2load measures (`--hit-client`)."""
    runs: list[tuple[str, str | None]] = []
    for arm in args.arms:
        if arm == "edge-hit" and args.hit_client != "python":
            runs += [(arm, None)] if args.hit_client == "both" else []
            runs.append((arm, H2LOAD))
        else:
            runs.append((arm, None))
    return runs


class Driver:
    """Runs every arm at every level, interleaved, and keeps the results file current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs = arm_runs(args)
        # Arms whose requests this process or its client processes send.
        self.python_arms = [arm for arm, client in self.runs if client is None]
        # h2load's edge-hit: the Python arm that seeded the entry and checks it before each level, the
        # prompt it seeded, and the edge workers' metrics endpoints.
        self.hit_arm: EdgeArm | None = None
        self.hit_prompt: Prompt | None = None
        self.hit_endpoints: list[str] = []
        self.engine: Any = None
        self.local: dict[str, Arm] = {}
        self.specs: dict[str, ArmSpec] = {}
        self.clients: ClientProcesses | None = None
        self.generator_info: Any = None
        self.results: dict[str, Any] = {
            "label": args.label,
            "command": command_line(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": device_name(),
            "params": {
                "arms": args.arms,
                "concurrency": args.concurrency,
                "prompts": f"dataset {args.dataset}" if args.dataset else f"{args.input_len} tokens (exact)",
                "til_prompts": f"the edge's request for diffs sized to a {args.til_input_len}-token chat prompt",
                "output_len": args.output_len,
                "rounds": args.rounds,
                "min_requests": args.min_requests,
                "warmup_output_len": args.warmup_output_len,
                "client_procs": args.client_procs,
                "hit_client": args.hit_client,
                "generator_replicas": args.generator_replicas,
                "stagger_s": args.stagger_s,
                "staggered_arms": args.staggered_arms if args.stagger_s > 0 else [],
            },
            "engine_settings": {},
            "rows": [],
        }

    async def setup(self) -> dict[str, PromptPool | TilPool]:
        """Starts the in-process engine, opens the network arms; returns a prompt pool per workload."""
        from transformers import AutoTokenizer

        args = self.args
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        pools: dict[str, PromptPool | TilPool] = {}
        if args.dataset:
            pools["plain"] = PromptPool(None, 0, load_dataset(args.dataset, tokenizer))
        else:
            pools["plain"] = PromptPool(PromptFactory(tokenizer, args.seed), args.input_len, None)

        if any(a in IN_PROCESS for a in args.arms):
            from services.generator.vllm_engine import VllmEngine

            settings = engine_settings(args)
            self.results["engine_settings"]["in-process"] = asdict(settings)
            print(f"starting the in-process vLLM engine: {settings}", flush=True)
            started = time.monotonic()
            self.engine = VllmEngine(settings)
            await self.engine.start()
            print(f"engine up and warm in {time.monotonic() - started:.1f}s", flush=True)
            self.results["engine_settings"]["in-process"] = self.engine.info.engine_settings
            self.local["engine"] = EngineArm(self.engine)
            self.local["engine-wrapper"] = EngineWrapperArm(self.engine)
            self.local["engine-til"] = EngineTilArm(self.engine)
            self.local["engine-wrapper-til"] = EngineWrapperTilArm(self.engine)

        targets = {
            "openai": args.openai_url,
            "openai-til": args.openai_url,
            "generator": args.generator_addr,
            "generator-til": args.generator_addr,
            "edge": args.edge_addr,
            "edge-hit": args.edge_addr,
        }
        generator_model = ""
        if any(a in ("generator", "generator-til", "edge", "edge-hit") for a in args.arms):
            self.generator_info = await generator_info(args.generator_addr)
            settings_seen = info_settings(self.generator_info)
            self.results["engine_settings"]["generator"] = settings_seen
            generator_model = settings_seen["model"]

        if any(a in TIL_ARMS for a in args.arms):
            from bench.til_workload import TilWorkload, edge_settings

            workload = TilWorkload(
                tokenizer,
                PromptFactory(tokenizer, args.seed + 2),
                target_tokens=args.til_input_len,
                output_len=args.output_len,
                info=self.generator_info or model_info_of(args),
                settings=edge_settings(),
                # The edge's token counts come from the generator's Tokenize, so ours do too when it runs.
                tokenize_addr=args.generator_addr if self.generator_info is not None else None,
            )
            self.results["params"]["til_token_counts"] = (
                f"the generator's Tokenize ({args.generator_addr})"
                if self.generator_info is not None
                else "the model's tokenizer, in the benchmark"
            )
            first = await workload.item(0)
            assert first.til is not None
            self.results["params"]["til_schema"] = first.til.schema()
            # One pool per TIL arm over one workload: every TIL arm sends the same diffs in the same order.
            for arm in (a for a in args.arms if a in TIL_ARMS):
                pools[arm] = TilPool(workload)

        for name in (a for a in args.arms if a in NETWORK):
            model = generator_model if name == "edge-hit" else args.openai_model
            self.specs[name] = ArmSpec(name=name, target=targets[name], model=model, cacher=args.cacher_addr)
        python_network = [name for name in self.specs if name in self.python_arms]
        if python_network and args.client_procs > 1:
            self.clients = ClientProcesses(args.client_procs)
        else:
            for name in python_network:
                self.local[name] = network_arm(self.specs[name])
                await self.local[name].open()
        return pools

    def row_facts(self, arm: str) -> dict[str, Any]:
        """What each row carries besides its figures: the workload, the replicas and the parallelism."""
        tp = self.args.tensor_parallel_size
        if arm in ("generator", "generator-til", "edge", "edge-hit") and self.generator_info is not None:
            tp = int(self.generator_info.engine_settings.get("tensor_parallel_size") or tp)
        return {
            "workload": "til" if arm in TIL_ARMS else "plain",
            "generator_replicas": self.args.generator_replicas if arm in ("edge", "edge-hit") else 1,
            "tensor_parallel_size": tp,
        }

    def client_load(self, arm: str, records: list[RequestRecord]) -> dict[str, Any]:
        """What the client processes spent on a network arm's batch: CPU per request, and the busiest
        process's CPU share of its wall time (near 1.0, the client was the limit)."""
        if self.clients is None or arm in self.local or not records:
            return {}
        return {
            "client_cpu_ms_per_request": round(1000 * self.clients.cpu_s / len(records), 3),
            "client_busiest_cpu_share": round(self.clients.busiest, 2),
        }

    def conclude(self) -> None:
        """Ratios between like rows, the issues' checks, the decode floor."""
        rows = self.results["rows"]
        self.results["ratios"] = compare.ratios(rows)
        self.results["checks"] = compare.checks(rows)
        config_path = Path(self.args.model) / "config.json"
        if config_path.exists():
            device = self.results["device"]
            if self.args.hbm_tb_s:
                compare.HBM_TB_S[device] = self.args.hbm_tb_s
            self.results["limits"] = compare.limits(
                json.loads(config_path.read_text()),
                device,
                self.args.concurrency,
                self.args.input_len,
                self.args.output_len,
            )

    async def batch(
        self,
        arm: str,
        pools: dict[str, PromptPool | TilPool],
        count: int,
        concurrency: int,
        output_len: int,
        label: str,
        stagger_s: float = 0.0,
    ) -> list[RequestRecord]:
        pool = pools[arm if arm in TIL_ARMS else "plain"]
        prompts: list[Prompt] = await pool.take(count) if isinstance(pool, TilPool) else pool.take(count)
        # Started a second from now, so that every client process is waiting when the first stream goes.
        stagger = Stagger(stagger_s, time.monotonic() + 1.0, concurrency) if stagger_s > 0 else None
        with Ticker(label, count, counting=arm in self.local) as ticker:
            if arm in self.local:
                if stagger is not None:
                    return await staggered_loop(
                        self.local[arm], prompts, concurrency, output_len, stagger, ticker.count
                    )
                return await closed_loop(self.local[arm], prompts, concurrency, output_len, ticker.count)
            assert self.clients is not None
            return await self.clients.run(self.specs[arm], prompts, concurrency, output_len, stagger)

    async def run(self) -> None:
        args = self.args
        pools = await self.setup()
        out: Path = args.out
        try:
            for arm in self.python_arms:
                print(f"[{arm}] first warm-up", flush=True)
                await self.batch(arm, pools, 8, 4, 16, f"{arm} first warm-up")
            runs = self.runs
            for level, concurrency in enumerate(args.concurrency):
                # Rotate the order so that no arm always runs right after another's load.
                order = runs[level % len(runs) :] + runs[: level % len(runs)]
                for arm, client in order:
                    if client == H2LOAD:
                        row = await self.h2load_hits(pools, concurrency)
                        self.add_row(f"[c={concurrency} {arm} h2load]", row)
                        continue
                    tag = f"[c={concurrency} {arm}]"
                    print(f"{tag} warm-up: {concurrency} requests", flush=True)
                    # E's warm-up asks for the measured entry (the budget is part of the cache key), so
                    # that every client process has seeded it and every edge worker has read it.
                    warm_len = args.output_len if arm == "edge-hit" else args.warmup_output_len
                    await self.batch(arm, pools, concurrency, concurrency, warm_len, tag)
                    count = max(args.rounds * concurrency, args.min_requests)
                    print(f"{tag} measuring: {count} requests", flush=True)
                    records = await self.batch(arm, pools, count, concurrency, args.output_len, tag)
                    self.add_row(tag, self.measured_row(arm, concurrency, records))
                    if args.stagger_s > 0 and concurrency > 1 and arm in args.staggered_arms:
                        await self.staggered_row(arm, pools, concurrency)
            write_all(self.results, out)
            print(f"results in {out}/results.md", flush=True)
        finally:
            await self.close()

    async def staggered_row(self, arm: str, pools: dict[str, PromptPool | TilPool], concurrency: int) -> None:
        """`arm` at `concurrency` again (warm from its lockstep row), with staggered arrivals: a ramp-up
        request, `--rounds` measured ones and a ramp-down request a stream."""
        args = self.args
        tag = f"[c={concurrency} {arm} staggered]"
        count = (args.rounds + 2) * concurrency
        print(f"{tag} measuring: {count} requests over {args.stagger_s:g} s of starts", flush=True)
        records = await self.batch(arm, pools, count, concurrency, args.output_len, tag, args.stagger_s)
        row = {**self.measured_row(arm, concurrency, records), "stagger_s": args.stagger_s}
        self.add_row(tag, row, f" ({row.get('measured_in_full_load', '-')} measured at full load)")

    def measured_row(self, arm: str, concurrency: int, records: list[RequestRecord]) -> dict[str, Any]:
        """A row of the table from an arm's measured batch."""
        return {
            "arm": arm,
            "concurrency": concurrency,
            **self.row_facts(arm),
            **summarize(records),
            **self.client_load(arm, records),
        }

    def add_row(self, tag: str, row: dict[str, Any], note: str = "") -> None:
        """Adds `row` to the results, prints it, and rewrites the results with it (a run cut short
        keeps every row measured so far)."""
        self.results["rows"].append(row)
        print(f"{tag} {row_line(row)}{note}", flush=True)
        self.conclude()
        write_all(self.results, self.args.out, with_plot=False)

    async def h2load_hits(self, pools: dict[str, PromptPool | TilPool], concurrency: int) -> dict[str, Any]:
        """The edge-hit row at `concurrency` with h2load as the client: the request the Python edge-hit
        arm sends after its seed, sent by `concurrency` h2load connections with one call in flight each,
        warmed up with one round, then `--h2load-rounds` rounds measured; the edge's counts must say
        that every call was answered OK from the cache."""
        args = self.args
        spec = self.specs["edge-hit"]
        tag = f"[c={concurrency} edge-hit h2load]"
        if self.hit_arm is None:
            pool = pools["edge-hit"]
            assert isinstance(pool, TilPool)
            self.hit_prompt = (await pool.take(1))[0]
            self.hit_arm = EdgeArm(spec)
            await self.hit_arm.open()
            self.hit_endpoints = h2grpc.edge_metrics_endpoints(args.edge_metrics, args.edge_workers)
            print(f"{tag} edge metrics: {', '.join(self.hit_endpoints)}", flush=True)
        assert self.hit_prompt is not None
        # One call through the Python arm (it seeds the entry the first time): the entry must answer as a
        # hit before h2load runs, and the call gives the lengths a hit replays.
        check = await self.hit_arm.one(self.hit_prompt, args.output_len)
        if not check.ok or check.note != "CACHE_STATUS_HIT":
            raise RuntimeError(f"{tag} the seeded entry did not answer as a hit: {check.error or check.note}")
        body = h2grpc.grpc_frame(self.hit_arm.hit_request(args.output_len))
        url = h2grpc.grpc_url(spec.target, h2grpc.EDGE_GENERATE_TIL)
        warm = h2grpc.Load(concurrency, concurrency, threads=args.h2load_threads)
        print(f"{tag} warm-up: {warm.describe()}", flush=True)
        await asyncio.to_thread(h2grpc.run_h2load, url, body, warm)
        count = max(args.h2load_rounds * concurrency, args.min_requests, concurrency)
        load = h2grpc.Load(count, concurrency, threads=args.h2load_threads)
        print(f"{tag} measuring: {load.describe()}", flush=True)
        before = h2grpc.read_edge_counts(self.hit_endpoints)
        run = await asyncio.to_thread(h2grpc.run_h2load, url, body, load)
        delta, problems = h2grpc.settled_delta(self.hit_endpoints, before, load.requests)
        return {
            "arm": "edge-hit",
            "client": H2LOAD,
            "concurrency": concurrency,
            **self.row_facts("edge-hit"),
            **h2load_row(h2grpc.summarize(run), check, delta, problems),
        }

    async def close(self) -> None:
        if self.hit_arm is not None:
            await self.hit_arm.close()
        for arm in self.local.values():
            await arm.close()
        if self.clients is not None:
            self.clients.close()
        if self.engine is not None:
            await self.engine.close()


async def generator_info(addr: str) -> Any:
    """The generator's GetModelInfoResponse."""
    import grpc
    from til.v1 import generator_pb2, generator_pb2_grpc

    async with grpc.aio.insecure_channel(addr) as channel:
        return await generator_pb2_grpc.GeneratorServiceStub(channel).GetModelInfo(
            generator_pb2.GetModelInfoRequest(), timeout=30
        )


def info_settings(info: Any) -> dict[str, str]:
    """The generator's engine settings as GetModelInfo reports them."""
    return {"model": info.model, "backend": info.backend, **dict(info.engine_settings)}


def model_info_of(args: argparse.Namespace) -> Any:
    """What a generator with the in-process engine's settings would report (no generator in this run)."""
    from til.v1 import generator_pb2

    return generator_pb2.GetModelInfoResponse(
        model=args.model_id,
        backend="vllm",
        model_path=args.model,
        max_model_len=args.max_model_len,
        default_max_tokens=args.output_len,
    )


def h2load_row(
    summary: dict[str, Any], check: RequestRecord, delta: h2grpc.EdgeCounts, problems: list[str]
) -> dict[str, Any]:
    """An edge-hit row's figures from an h2load run: the fields of `summarize`'s rows that apply, TTFT
    and E2E both being the end of the stream; the lengths are those the check call saw replayed."""
    requests = summary["requests"]
    http_ok = requests - summary["failures"]
    confirmed = max(0, min(http_ok, int(delta.codes.get("OK", 0)), int(delta.cached)))
    errors = dict(summary["failures_by_status"])
    if unconfirmed := http_ok - confirmed:
        errors["HTTP 200 but not counted OK and a hit by the edge"] = unconfirmed
    row: dict[str, Any] = {
        "requests": requests,
        "failures": requests - confirmed,
        "errors": errors,
        "notes": {"CACHE_STATUS_HIT": int(delta.cached)},
        "latency": "end of stream",
        "h2load": {
            key: summary[key]
            for key in ("connections", "streams_per_connection", "h2load_threads", "h2load_counts")
        },
        "edge_counted": {"codes": {k: int(v) for k, v in delta.codes.items()}, "cached": int(delta.cached)},
        "edge_problems": problems,
        "client_cpu_ms_per_request": summary["h2load_cpu_ms_per_request"],
    }
    if delta.cpu_s > 0 and confirmed:
        # The edge workers' CPU a hit (their metrics, read before and after; a little of it is the
        # reads themselves), and how many of the host's cores they kept busy on average.
        row["edge_cpu_ms_per_request"] = round(1000 * delta.cpu_s / confirmed, 3)
        if summary.get("wall_s"):
            row["edge_cpu_cores"] = round(delta.cpu_s / summary["wall_s"], 2)
    if "end_of_stream_ms_p50" not in summary or not confirmed:
        return row
    wall = summary["wall_s"]
    p50, p99 = summary["end_of_stream_ms_p50"], summary["end_of_stream_ms_p99"]
    samples = summary["end_of_stream_ms_samples"]
    row.update(
        wall_s=wall,
        output_tok_s=round(check.tokens * confirmed / wall, 1),
        requests_s=round(confirmed / wall, 3),
        prompt_tokens_mean=float(check.prompt_tokens),
        output_tokens_mean=float(check.tokens),
        ttft_ms_p50=p50,
        ttft_ms_p99=p99,
        e2e_ms_p50=p50,
        e2e_ms_p99=p99,
        e2e_ms_max=summary["end_of_stream_ms_max"],
        samples={"e2e_ms": [round(v, 2) for v in samples]},
    )
    return row


def row_line(row: dict[str, Any]) -> str:
    if row.get("client") == H2LOAD:
        h2 = row["h2load"]
        head = f"{row['requests']} requests over {h2['connections']} connections x {h2['streams_per_connection']}"
        if "output_tok_s" not in row:
            return f"{head}: none confirmed: {row['errors']} {row['edge_problems']}"
        return (
            f"{head}: end of stream p50 {row['e2e_ms_p50']:.2f} p99 {row['e2e_ms_p99']:.2f} ms,"
            f" {row['requests_s']:,.0f} req/s, {row['output_tokens_mean']:.0f} out tok/req,"
            f" h2load CPU {row['client_cpu_ms_per_request']:.3f} ms/req,"
            f" edge CPU {row.get('edge_cpu_ms_per_request', '-')} ms/req on {row.get('edge_cpu_cores', '-')} cores,"
            f" {row['failures']} failed" + (f" {row['edge_problems']}" if row["edge_problems"] else "")
        )
    if "output_tok_s" not in row:
        return f"all {row['requests']} requests failed: {row['errors']}"
    return (
        f"{row['output_tok_s']:,.0f} tok/s, {row['output_tokens_mean']:.0f} out tok/req,"
        f" {row['prompt_tokens_mean']:.0f} prompt tok/req, TTFT p50 {row['ttft_ms_p50']:.1f} p99 {row['ttft_ms_p99']:.1f} ms,"
        f" TPOT p50 {row['tpot_ms_p50']:.2f} ms, ITL p99 {row['itl_ms_p99']:.2f} ms,"
        f" {row['tokens_per_message']:.2f} tok/msg, {row['failures']} failed"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    asyncio.run(Driver(args).run())


if __name__ == "__main__":
    main()
