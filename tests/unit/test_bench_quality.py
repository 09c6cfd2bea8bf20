"""The model table's scoring (bench.quality.run): what counts as a title or keyword that repeats."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from bench.quality.run import DATE, VramPeak, repeated_ngram_rate, service_env, title_or_keyword_repeat


@pytest.mark.parametrize(
    ("document", "repeat"),
    [
        ({"title": f"{DATE} TIL - Redis 캐시조회 도입", "keywords": ["캐시", "Redis 캐시"]}, None),
        ({"title": f"{DATE} TIL - 해당 해당", "keywords": ["캐시"]}, "해당"),
        ({"title": f"{DATE} TIL - xtl.json.til.TIL 함수", "keywords": ["캐시"]}, "TIL"),
        ({"title": f"{DATE} TIL - 해당해당", "keywords": ["캐시"]}, "해당해당"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": ["til.go# 해당", "TIL.go# 해당"]}, "til.go# 해당"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": ["til.json.TIL 해당"]}, "TIL"),
        ({"title": f"{DATE} TIL - 캐시", "keywords": "not a list"}, None),
        ({}, None),
    ],
)
def test_title_or_keyword_repeats_are_found(document: dict[str, Any], repeat: str | None) -> None:
    assert title_or_keyword_repeat(document) == repeat


def test_repeated_ngram_rate() -> None:
    assert repeated_ngram_rate("a b c a b c") == pytest.approx(1 / 4)
    assert repeated_ngram_rate("a b c d") == 0.0


def test_vram_peak_samples_nvidia_smi_above_what_was_in_use_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls"
    fake = tmp_path / "nvidia-smi"
    # 1000 MiB in use before (another engine), then 1500, 4000, 2500 on two GPUs' worth of lines.
    fake.write_text(
        "#!/bin/sh\n"
        # The count is replaced whole (written, then renamed): the test reads it meanwhile.
        f"n=$(cat {calls} 2>/dev/null || echo 0); echo $((n + 1)) > {calls}.$$ && mv {calls}.$$ {calls}\n"
        "case $n in 0) echo 600; echo 400;; 1) echo 1500; echo 0;; 2) echo 4000; echo 0;; *) echo 2500; echo 0;; esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with VramPeak(interval_s=0.01) as vram:
        while int(calls.read_text()) < 5:
            time.sleep(0.01)
    assert (vram.baseline_mib, vram.peak_mib) == (1000.0, 4000.0)


def test_env_goes_to_the_service_its_prefix_names() -> None:
    env = service_env(
        ["EDGE_RETRIEVAL_TOP_K=0", "GENERATOR_BACKEND=vllm", "CACHER_X=a=b"], ("cacher", "generator", "edge")
    )
    assert env == {
        "cacher": {"CACHER_X": "a=b"},
        "generator": {"GENERATOR_BACKEND": "vllm"},
        "edge": {"EDGE_RETRIEVAL_TOP_K": "0"},
    }
    with pytest.raises(SystemExit, match="RETRIEVER_X"):
        service_env(["RETRIEVER_X=1"], ("cacher", "generator", "edge"))
