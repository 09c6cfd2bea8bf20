"""Child processes that die with their parent."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` run so that the child gets SIGTERM when the process that started it dies (Linux).

    util-linux's `setpriv --pdeathsig` sets the signal in the child itself, so the parent needs no `preexec_fn`:
    a Python-level fork hook would run after fork() in a process whose gRPC threads are gone, which can abort the
    child. Where setpriv is missing, the child simply runs without the guard.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)
