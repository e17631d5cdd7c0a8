"""A spawned simulator ends itself when the manager that started it is gone.

Under local comms the simulators are the manager's children. A manager killed outright (the
kernel's out-of-memory killer, SIGKILL) cannot stop them, and without this they would keep
the machine's memory and cores until ended by hand. Nothing here imports torch, so the watch
starts first in a new process, before the seconds of its imports.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """Watch, in a daemon thread, for this process's parent to change (it died: the process was
    re-parented), and then exit at once: there is no one left to report to or clean up for."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
