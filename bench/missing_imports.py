"""Lists every top-level module an import needs that this Python lacks (one dry run, no install).

    PYTHONPATH=/tmp/site python3 -m bench.missing_imports vllm.entrypoints.openai.api_server

Imports the target; each time a module is missing it records the name, puts a stand-in module in
its place and tries again, so one run finds them all (not just the first). Used to decide which
wheels to carry to the GPU machine for `vllm serve`. A stand-in can break the import in other
ways late in the chain; those errors are printed, not hidden.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from typing import Any
from unittest import mock


class _StandIn(types.ModuleType):
    """A module whose every attribute exists (a MagicMock), importable as a package too."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.__name__}.{name}")


def missing_modules(target: str, attempts: int = 60) -> tuple[list[str], str | None]:
    missing: list[str] = []
    for _ in range(attempts):
        try:
            importlib.import_module(target)
            return missing, None
        except ModuleNotFoundError as exc:
            name = exc.name or ""
            if not name or name in missing or name in sys.modules:
                return missing, f"{type(exc).__name__}: {exc}"
            missing.append(name)
            sys.modules[name] = _StandIn(name)
            for loaded in [m for m in sys.modules if m == target or m.startswith(target + ".")]:
                del sys.modules[loaded]
        except Exception as exc:
            return missing, f"{type(exc).__name__}: {exc}"
    return missing, "gave up"


def main() -> None:
    targets = sys.argv[1:] or ["vllm.entrypoints.openai.api_server"]
    for target in targets:
        missing, error = missing_modules(target)
        tops = sorted({name.split(".")[0] for name in missing})
        print(f"{target}: missing {tops or 'nothing'}" + (f"; then {error}" if error else ""))


if __name__ == "__main__":
    main()
