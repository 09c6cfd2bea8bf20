"""The vLLM backend's CPU-side logic: settings -> engine args, sampling, limits, load, lazy import.

The engine itself needs a GPU and vLLM; `bench/vllm_smoke.py` exercises it there.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator.engine import (
    ChatTurn,
    EngineLoad,
    EngineRequest,
    EngineUnavailable,
    GenerationEngine,
    InvalidRequest,
    PromptTooLong,
    Sampling,
)
from services.generator.vllm_compat import SchedulerCounts
from services.generator.vllm_engine import (
    VllmEngine,
    check_fits,
    engine_args,
    finish_reason_of,
    sampling_kwargs,
    split_load,
)
from services.generator.vllm_inputs import prompt_ids


@dataclass(frozen=True)
class Settings:
    model: str = "/models/llama-3.1-8b-instruct"
    model_id: str = "llama-3.1-8b-instruct"
    tokenizer: str | None = None
    max_model_len: int | None = 8192
    default_max_tokens: int = 1024
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 2
    quantization: str | None = "awq"
    max_num_seqs: int | None = 128
    enable_prefix_caching: bool | None = True
    seed: int | None = 7
    stream_interval: int | None = 4
    load_format: str = "dummy"
    trust_remote_code: bool = False
    structured_output_parallel_threshold: int | None = None
    structured_output_parallel_workers: int | None = None
    structured_output_parallel_batch_size: int | None = None
    structured_output_fill: str | None = None
    schema_compile_timeout_s: float = 10.0
    schema_workers: int = 0


def request(**overrides: Any) -> EngineRequest:
    fields: dict[str, Any] = {"request_id": "r1", "prompt": "hi", "messages": None, "max_tokens": 32}
    fields.update(overrides)
    return EngineRequest(**fields)


def test_importing_the_backend_does_not_import_vllm() -> None:
    code = "import sys, services.generator.vllm_engine; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_engine_is_a_generation_engine_and_describes_its_settings_before_start() -> None:
    engine = VllmEngine(Settings())
    assert isinstance(engine, GenerationEngine)
    assert engine.info.backend == "vllm"
    assert engine.info.model == "llama-3.1-8b-instruct"
    assert engine.info.model_path == "/models/llama-3.1-8b-instruct"
    assert engine.info.max_model_len == 8192
    assert engine.info.default_max_tokens == 1024
    assert engine.info.engine_settings["quantization"] == "awq"
    assert engine.info.engine_settings["tensor_parallel_size"] == "2"
    assert engine.load() == EngineLoad(running=0, waiting=0)


async def test_generate_before_start_is_unavailable() -> None:
    engine = VllmEngine(Settings())
    with pytest.raises(EngineUnavailable):
        await anext(aiter(engine.generate(request())))


def test_engine_args_carry_every_setting() -> None:
    args = engine_args(Settings())
    assert args == {
        "model": "/models/llama-3.1-8b-instruct",
        "served_model_name": "llama-3.1-8b-instruct",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.85,
        "tensor_parallel_size": 2,
        "load_format": "dummy",
        "trust_remote_code": False,
        "enable_log_requests": False,
        "structured_outputs_config": {
            "backend": "guidance",
            "disable_any_whitespace": True,
            "disable_additional_properties": True,
        },
        "max_model_len": 8192,
        "quantization": "awq",
        "max_num_seqs": 128,
        "enable_prefix_caching": True,
        "seed": 7,
        "stream_interval": 4,
    }


def test_unset_settings_leave_vllm_defaults() -> None:
    settings = Settings(
        tokenizer="",
        max_model_len=None,
        quantization=None,
        max_num_seqs=None,
        enable_prefix_caching=None,
        seed=None,
        stream_interval=None,
    )
    args = engine_args(settings)
    for key in (
        "tokenizer",
        "max_model_len",
        "quantization",
        "max_num_seqs",
        "enable_prefix_caching",
        "seed",
        "stream_interval",
    ):
        assert key not in args
    assert engine_args(replace(settings, tokenizer="/tok"))["tokenizer"] == "/tok"


def test_engine_args_build_async_engine_args() -> None:
    vllm = pytest.importorskip("vllm")
    args = vllm.AsyncEngineArgs(**engine_args(Settings()))
    assert (args.model, args.quantization, args.load_format) == (
        "/models/llama-3.1-8b-instruct",
        "awq",
        "dummy",
    )


def test_generator_settings_fit_the_backend() -> None:
    config = pytest.importorskip("services.generator.config")
    settings = config.GeneratorSettings()
    args = engine_args(settings)
    assert args["model"] == settings.model
    assert args["gpu_memory_utilization"] == settings.gpu_memory_utilization
    assert VllmEngine(settings).info.default_max_tokens == settings.default_max_tokens


def test_sampling_defaults_come_from_the_model_and_request_fields_override_them() -> None:
    model_defaults = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 4096}
    kwargs = sampling_kwargs(request(), model_defaults)
    assert kwargs == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 32, "ignore_eos": False}

    explicit = Sampling(
        temperature=0.0,
        top_p=1.0,
        top_k=20,
        repetition_penalty=1.1,
        seed=3,
        frequency_penalty=0.5,
        presence_penalty=-0.25,
    )
    kwargs = sampling_kwargs(request(sampling=explicit, stop=("\n\n",), ignore_eos=True), model_defaults)
    assert kwargs == {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "seed": 3,
        "max_tokens": 32,
        "ignore_eos": True,
        "stop": ["\n\n"],
    }


@pytest.mark.parametrize(
    ("prompt", "output", "fits"), [(4000, 96, True), (4000, 97, False), (4097, 0, False)]
)
def test_prompt_plus_output_must_fit_the_context(prompt: int, output: int, fits: bool) -> None:
    if fits:
        check_fits(prompt, output, 4096)
    else:
        with pytest.raises(PromptTooLong, match="4096"):
            check_fits(prompt, output, 4096)


def test_finish_reasons() -> None:
    assert finish_reason_of("stop") == "stop"
    assert finish_reason_of("length") == "length"
    assert finish_reason_of("repetition") == "stop"
    assert finish_reason_of("abort") is None
    assert finish_reason_of("error") is None


def test_scheduler_counts_keep_the_last_stats() -> None:
    counts = SchedulerCounts()
    counts.update(
        SimpleNamespace(
            num_running_reqs=12, num_waiting_reqs=5, num_skipped_waiting_reqs=2, kv_cache_usage=0.25
        )
    )
    assert (counts.running, counts.waiting, counts.kv_cache_usage) == (12, 7, 0.25)


@pytest.mark.parametrize(
    ("unfinished", "waiting", "expected"),
    [
        (19, 7, EngineLoad(running=12, waiting=7)),
        (3, 7, EngineLoad(running=0, waiting=3)),
        (0, 7, EngineLoad(0, 0)),
    ],
)
def test_load_is_bounded_by_live_requests(unfinished: int, waiting: int, expected: EngineLoad) -> None:
    assert split_load(unfinished, waiting) == expected


class ChatTokenizer:
    """Stands in for vLLM's HF tokenizer: one token per character, BOS = 1."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        if messages[0]["role"] == "tool":
            raise ValueError("unknown role")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_raw_prompts_get_special_tokens_and_chats_get_them_from_the_template() -> None:
    tok = ChatTokenizer()
    assert prompt_ids(tok, "ab", None) == [1, ord("a"), ord("b")]
    chat = request(prompt=None, messages=(ChatTurn("user", "x"),))
    assert prompt_ids(tok, None, chat.messages) == [ord(c) for c in "<user>x<assistant>"]


def test_a_chat_the_template_rejects_is_invalid_argument() -> None:
    chat = request(prompt=None, messages=(ChatTurn("tool", "x"),))
    with pytest.raises(InvalidRequest, match="unknown role"):
        prompt_ids(ChatTokenizer(), None, chat.messages)
