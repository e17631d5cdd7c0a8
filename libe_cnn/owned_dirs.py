"""Directories a run owns on its host (its shared memory, its private Redis's files), and the
removal of those whose owner is gone.

Each holds a file `owner` with "<pid> <host>" of the process that made it. That process removes
its directories when it ends, on Ctrl-C and on failures; one killed outright (SIGKILL, the kernel's
out-of-memory killer) cannot, so every run first removes the directories its user's dead
runs left on this host, and never one of a live run or of another user.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

OWNER = "owner"


def mark_owned(directory: Path) -> None:
    """Record this process as the owner of `directory`."""
    (Path(directory) / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def remove_orphans(root: Path, prefix: str) -> list[Path]:
    """Remove root/prefix* directories of this user on this host whose owner process is gone."""
    removed = []
    for directory in Path(root).glob(f"{prefix}*"):
        try:
            if directory.stat().st_uid != os.getuid():
                continue  # someone else's
            pid, host = (directory / OWNER).read_text().split()
        except (OSError, ValueError):
            continue  # being made or removed right now, or not one this tool marked
        if host != socket.gethostname() or _alive(int(pid)):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
