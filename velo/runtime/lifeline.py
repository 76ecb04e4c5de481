"""Children that die with their parent: a stack or a cloudd killed outright must not leave its
daemons or its LLM server running.

The parent puts its pid in the child's environment (`child_env`); the child, first thing,
asks Linux for SIGTERM when its parent goes (`follow_parent`). This is done in the child after
exec, not in a `preexec_fn`: running Python between fork and exec in a process with gRPC
threads crashed the children now and then (SIGABRT, SIGSEGV) before they logged anything.
Linux ties the signal to the thread that forked: spawn children from a thread that lives as
long as they do.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "VELO_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child that should die with this process."""
    return {**env, PARENT_ENV: str(os.getpid())}


def follow_parent() -> None:
    """In the child: SIGTERM ourselves when the parent that set PARENT_ENV dies (and at once
    if it already has). A no-op elsewhere than Linux or without the variable."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
