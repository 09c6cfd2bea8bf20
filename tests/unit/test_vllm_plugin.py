"""The vLLM general plugin that fills structured-output bitmasks in parallel, without vLLM or a GPU.

`FillMaskManager` has the attribute shape of vLLM 0.25.1's `StructuredOutputManager` where the
plugin touches it (vllm/v1/structured_output/__init__.py); `bench/vllm_smoke.py
--bitmask-parallel-threshold 0` checks the real one on a GPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.generator import vllm_plugin
from services.generator.vllm_plugin import (
    ENV_BATCH_SIZE,
    ENV_FILL,
    ENV_THRESHOLD,
    ENV_WORKERS,
    REPORT_METHOD,
    BitmaskParallelism,
    BitmaskParallelismNotApplied,
    check_in_force,
    install,
    register,
)

ROOT = Path(__file__).resolve().parents[2]
GROUP = "vllm.general_plugins"

# The parts of vLLM 0.25.1's StructuredOutputManager.__init__ the plugin depends on.
MANAGER_SOURCE = """
import multiprocessing
from concurrent.futures import ThreadPoolExecutor


class StructuredOutputManager:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        max_batch_size = vllm_config.scheduler_config.max_num_seqs
        self.fill_bitmask_parallel_threshold = 128
        if self.fill_bitmask_parallel_threshold < max_batch_size:
            self.fill_bitmask_parallel_batch_size = 16
            max_workers = max(1, min(multiprocessing.cpu_count() // 2, 8))
            self.executor_for_fillmask = ThreadPoolExecutor(max_workers=max_workers)

        self.executor = ThreadPoolExecutor(max_workers=2)  # grammar compiles

    def grammar_init(self, request):
        if request.structured_output_request is None:
            return
        grammar = self.executor.submit(self._create_grammar, request)
        request.structured_output_request.grammar = grammar

    def _create_grammar(self, request):
        return ("grammar", request.request_id)

    def _async_submit_fill_bitmask(self, batch):
        return self.executor_for_fillmask.submit(len, batch)

    def grammar_bitmask(self, requests, structured_output_request_ids, scheduled_spec_decode_tokens):
        return None
"""

CORE_SOURCE = """
from vllm.v1.structured_output import StructuredOutputManager


class EngineCore:
    def __init__(self, vllm_config):
        self.structured_output_manager = StructuredOutputManager(vllm_config)
"""


def config(max_num_seqs: int) -> Any:
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))


@pytest.fixture
def vllm_classes() -> tuple[type, type]:
    """Fresh stand-ins for StructuredOutputManager and EngineCore (the plugin edits classes)."""
    namespace: dict[str, Any] = {}
    exec(MANAGER_SOURCE, namespace)
    manager_cls = namespace["StructuredOutputManager"]

    class EngineCore:
        def __init__(self, vllm_config: Any) -> None:
            self.structured_output_manager = manager_cls(vllm_config)

    return manager_cls, EngineCore


def test_the_package_registers_the_plugin_with_vllm(tmp_path: Path) -> None:
    """The distribution's metadata, as importlib.metadata (and so vLLM) reads it, names `register`."""
    # Metadata built from this checkout's pyproject.toml, as an install writes it.
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info", "--egg-base", tmp_path],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    (dist,) = [d for d in importlib.metadata.distributions(path=[str(tmp_path)]) if d.name == "tilserve"]
    (entry,) = dist.entry_points.select(group=GROUP)
    assert (entry.name, entry.value) == ("tilserve", "services.generator.vllm_plugin:register")
    assert entry.load() is register


def test_an_installed_tilserve_registers_it_too() -> None:
    try:
        dist = importlib.metadata.distribution("tilserve")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tilserve is not installed")
    entries = dist.entry_points.select(group=GROUP)
    if not entries:
        pytest.skip("the installed metadata predates the plugin: reinstall (make setup)")
    assert [e.value for e in entries] == ["services.generator.vllm_plugin:register"]


def test_settings_travel_through_the_environment() -> None:
    wanted = BitmaskParallelism(threshold=0, workers=12, batch_size=4)
    env = {k: v for k, v in wanted.environment().items() if v is not None}
    assert env == {ENV_THRESHOLD: "0", ENV_WORKERS: "12", ENV_BATCH_SIZE: "4"}
    assert BitmaskParallelism.from_environment(env) == wanted
    partial = BitmaskParallelism(threshold=0)
    assert partial.environment() == {
        ENV_THRESHOLD: "0", ENV_WORKERS: None, ENV_BATCH_SIZE: None, ENV_FILL: None,
    }  # fmt: skip
    filled = BitmaskParallelism(fill="llguidance")
    assert filled.requested and BitmaskParallelism.from_environment({ENV_FILL: "llguidance"}) == filled
    assert BitmaskParallelism.from_environment({ENV_THRESHOLD: "0", ENV_WORKERS: " "}) == partial
    assert not BitmaskParallelism.from_environment({}).requested


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({ENV_THRESHOLD: "zero"}, f"{ENV_THRESHOLD}='zero' is not an integer"),
        ({ENV_WORKERS: "0"}, "workers must be"),
        ({ENV_FILL: "rayon"}, "fill must be one of threads, llguidance"),
    ],
)
def test_bad_environment_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BitmaskParallelism.from_environment(env)


def test_the_plugin_applies_threshold_workers_and_batch_size(vllm_classes: tuple[type, type]) -> None:
    manager_cls, core_cls = vllm_classes
    assert (
        install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0, workers=3, batch_size=4))
        is None
    )
    core = core_cls(config(max_num_seqs=256))
    manager = core.structured_output_manager
    assert manager.fill_bitmask_parallel_threshold == 0
    assert manager.fill_bitmask_parallel_batch_size == 4
    assert manager.executor_for_fillmask._max_workers == 3
    # The pool works: what vLLM's parallel path submits to it runs there.
    assert manager._async_submit_fill_bitmask([1, 2]).result(timeout=5) == 2
    assert getattr(core, REPORT_METHOD)() == {
        "applied": True, "reason": "", "threshold": 0, "workers": 3, "batch_size": 4, "fill": "threads",
    }  # fmt: skip


def test_a_threshold_alone_gets_a_pool_where_vllm_built_none(vllm_classes: tuple[type, type]) -> None:
    """vLLM builds the pool only when 128 < max_num_seqs; with 64 the plugin must build it."""
    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0))
    report = getattr(core_cls(config(max_num_seqs=64)), REPORT_METHOD)()
    assert report == {
        "applied": True, "reason": "", "threshold": 0,
        "workers": vllm_plugin.vllm_default_workers(), "batch_size": vllm_plugin.VLLM_BATCH_SIZE,
        "fill": "threads",
    }  # fmt: skip
    assert isinstance(manager_cls(config(64)).executor_for_fillmask, ThreadPoolExecutor)


class Grammar:
    """vLLM's GuidanceGrammar where the fill touches it: its matcher, `is_terminated`, `check_error`."""

    def __init__(self, matcher: Any, terminated: bool = False) -> None:
        self.ll_matcher = matcher
        self.terminated = terminated
        self.checked = 0

    def is_terminated(self) -> bool:
        return self.terminated

    def check_error(self) -> None:
        self.checked += 1

    def fill_bitmask(self, bitmask: Any, index: int) -> None:  # vLLM's per-request fill
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self.ll_matcher, bitmask, index)


def test_the_llguidance_fill_takes_all_cpus_but_two_unless_told(
    vllm_classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vllm_plugin.os, "cpu_count", lambda: 16)
    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0, fill="llguidance"))
    assert getattr(core_cls(config(max_num_seqs=256)), REPORT_METHOD)()["workers"] == 14
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0))
    assert getattr(core_cls(config(max_num_seqs=256)), REPORT_METHOD)()["workers"] == 8  # vLLM's own
    monkeypatch.setattr(vllm_plugin.os, "cpu_count", lambda: 2)
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0, fill="llguidance"))
    assert getattr(core_cls(config(max_num_seqs=256)), REPORT_METHOD)()["workers"] == 1


def test_the_llguidance_fill_writes_what_vllms_own_fill_writes(vllm_classes: tuple[type, type]) -> None:
    """One LLExecutor call for the batch: each open grammar's mask, all ones where vLLM writes them,
    and grammars of another backend through vLLM's own `_fill_bitmasks`."""
    import llguidance.torch
    import torch
    from llguidance import LLMatcher

    from services.generator.fake_engine import _BYTE_TOKENIZER

    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=0, workers=2, fill="llguidance"))
    core = core_cls(config(max_num_seqs=256))
    manager = core.structured_output_manager
    assert getattr(core, REPORT_METHOD)() == {
        "applied": True, "reason": "", "threshold": 0, "workers": 2,
        "batch_size": vllm_plugin.LLGUIDANCE_BATCH_SIZE, "fill": "llguidance",
    }  # fmt: skip
    vocab = _BYTE_TOKENIZER.vocab_size
    manager._grammar_bitmask = torch.zeros((6, (vocab + 31) // 32), dtype=torch.int32)
    manager._full_mask = torch.tensor(-1, dtype=torch.int32)
    others: list[Any] = []
    manager._fill_bitmasks = others.extend

    def matcher(pattern: str, consumed: bytes) -> Any:
        m = LLMatcher(_BYTE_TOKENIZER, LLMatcher.grammar_from_regex(pattern))
        assert m.consume_tokens(list(consumed))
        return m

    grammars = [Grammar(matcher("[0-9]{3}", b"1")), Grammar(matcher("abc|abd", b"ab"))]
    terminated, unapplied = Grammar(matcher("x", b""), terminated=True), Grammar(matcher("y", b""))
    foreign = SimpleNamespace(is_terminated=lambda: False)
    batch = [(grammars[0], 0, True), (terminated, 1, True), (unapplied, 2, False), (foreign, 3, True),
             (grammars[1], 5, True)]  # fmt: skip
    assert manager._async_submit_fill_bitmask(batch).result(timeout=5) is None
    expected = torch.zeros_like(manager._grammar_bitmask)
    for grammar, row in zip(grammars, (0, 5), strict=True):
        llguidance.torch.fill_next_token_bitmask(grammar.ll_matcher, expected, row)
        assert grammar.checked == 1
    assert torch.equal(manager._grammar_bitmask[[0, 5]], expected[[0, 5]])
    allowed = [t for t in range(vocab) if manager._grammar_bitmask[5, t // 32] >> (t % 32) & 1]
    assert allowed == [ord("c"), ord("d")]
    assert (manager._grammar_bitmask[[1, 2]] == -1).all()  # all ones, as vLLM writes them
    assert (manager._grammar_bitmask[4] == 0).all()  # a row not in the batch is left alone
    assert others == [(foreign, 3, True)]


def test_installing_twice_wraps_the_constructor_once(vllm_classes: tuple[type, type]) -> None:
    manager_cls, core_cls = vllm_classes
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=8))
    install(manager_cls, core_cls, lambda: BitmaskParallelism(threshold=2))
    assert manager_cls.__init__.__wrapped__.__qualname__ == "StructuredOutputManager.__init__"
    assert manager_cls(config(256)).fill_bitmask_parallel_threshold == 2


def test_each_manager_follows_the_environment_as_it_is_built(
    vllm_classes: tuple[type, type], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forked engine core inherits the class patched for an earlier engine of the same process."""
    manager_cls, core_cls = vllm_classes
    monkeypatch.setenv(ENV_THRESHOLD, "0")
    install(manager_cls, core_cls)
    assert manager_cls(config(256)).fill_bitmask_parallel_threshold == 0
    monkeypatch.setenv(ENV_THRESHOLD, "4")
    monkeypatch.setenv(ENV_WORKERS, "2")
    report = getattr(core_cls(config(256)), REPORT_METHOD)()
    assert (report["applied"], report["threshold"], report["workers"]) == (True, 4, 2)
    monkeypatch.delenv(ENV_THRESHOLD)
    monkeypatch.delenv(ENV_WORKERS)
    report = getattr(core_cls(config(256)), REPORT_METHOD)()
    assert (report["applied"], report["threshold"]) == (False, 128)  # nothing asked: vLLM's own
    monkeypatch.setenv(ENV_WORKERS, "many")
    report = getattr(core_cls(config(256)), REPORT_METHOD)()
    assert report["applied"] is False and "not an integer" in report["reason"]


def test_a_vllm_of_another_shape_is_reported_not_applied(vllm_classes: tuple[type, type]) -> None:
    core_cls = vllm_classes[1]

    class Renamed:
        def __init__(self, vllm_config: Any) -> None:
            self.parallel_threshold = 128

        def grammar_bitmask(self) -> None: ...

    assert "has no _async_submit_fill_bitmask" in (
        install(Renamed, core_cls, lambda: BitmaskParallelism(0)) or ""
    )
    assert not hasattr(core_cls, REPORT_METHOD)

    class NoThreshold(Renamed):
        def _async_submit_fill_bitmask(self) -> None: ...

    class Core:
        structured_output_manager: Any = None

    assert install(NoThreshold, Core, lambda: BitmaskParallelism(0)) is None
    core = Core()
    core.structured_output_manager = NoThreshold(config(256))  # built without a crash
    report = getattr(core, REPORT_METHOD)()
    assert report["applied"] is False and "fill_bitmask_parallel_threshold" in report["reason"]


def test_check_in_force_reports_and_refuses() -> None:
    assert check_in_force(BitmaskParallelism(), None) == {"bitmask_parallelism": "vllm default"}
    wanted = BitmaskParallelism(threshold=0, workers=8)
    report = {"applied": True, "reason": "", "threshold": 0, "workers": 8, "batch_size": 16}
    assert check_in_force(wanted, report) == {
        "bitmask_parallelism": "applied",
        "bitmask_parallel_threshold": "0",
        "bitmask_parallel_workers": "8",
        "bitmask_parallel_batch_size": "16",
    }
    assert (
        check_in_force(BitmaskParallelism(fill="llguidance"), {**report, "fill": "llguidance"})[
            "bitmask_parallel_fill"
        ]
        == "llguidance"
    )
    with pytest.raises(BitmaskParallelismNotApplied, match="fill is 'threads', not 'llguidance'"):
        check_in_force(BitmaskParallelism(fill="llguidance"), {**report, "fill": "threads"})
    with pytest.raises(BitmaskParallelismNotApplied, match="did not answer"):
        check_in_force(wanted, {"applied": False, "reason": "the engine core did not answer"})
    with pytest.raises(BitmaskParallelismNotApplied, match="workers is 4, not 8"):
        check_in_force(wanted, {**report, "workers": 4})
    with pytest.raises(BitmaskParallelismNotApplied, match="VLLM_PLUGINS"):
        check_in_force(wanted, None)


def test_register_without_vllm_or_without_a_request_does_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (ENV_THRESHOLD, ENV_WORKERS, ENV_BATCH_SIZE, ENV_FILL):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("INFO"):
        register()  # nothing asked: returns before any import
    assert "not applied" not in caplog.text
    monkeypatch.setenv(ENV_THRESHOLD, "0")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm.* raises ImportError
    caplog.clear()
    with caplog.at_level("INFO"):
        register()  # vLLM missing: said, not raised
    assert "not applied" in caplog.text
    monkeypatch.setenv(ENV_THRESHOLD, "-1")
    caplog.clear()
    with caplog.at_level("INFO"):
        register()  # a bad value is logged, not raised
    assert "not applied" in caplog.text


def test_vllm_loading_the_plugin_in_a_fresh_process_applies_the_environment(tmp_path: Path) -> None:
    """What vLLM's engine core does: find the entry point, call it, then build its manager."""
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info", "--egg-base", tmp_path],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    fake = tmp_path / "fake_vllm"
    for package in ("vllm", "vllm/v1", "vllm/v1/engine", "vllm/v1/structured_output"):
        (fake / package).mkdir(parents=True, exist_ok=True)
        (fake / package / "__init__.py").write_text("")
    (fake / "vllm/v1/structured_output/__init__.py").write_text(MANAGER_SOURCE)
    (fake / "vllm/v1/engine/core.py").write_text(CORE_SOURCE)
    script = textwrap.dedent(f"""
        import json
        from importlib.metadata import entry_points
        from types import SimpleNamespace
        for plugin in entry_points(group="{GROUP}"):
            plugin.load()()
        from vllm.v1.engine.core import EngineCore
        cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=256))
        print(json.dumps(getattr(EngineCore(cfg), "{REPORT_METHOD}")()))
    """)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(fake), str(ROOT), str(ROOT / "gen")]),
        ENV_THRESHOLD: "0",
        ENV_WORKERS: "5",
    }
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == (
        '{"applied": true, "reason": "", "threshold": 0, "workers": 5, "batch_size": 16, "fill": "threads"}'
    )
