"""A streaming simulator's messages from the manager (sync and ring-allreduce): its rows, one
per step, taken only when it reports a step, and the manager's stop, noticed while it waits on
the store."""

from __future__ import annotations

from collections import deque

import numpy as np
from libensemble.message_numbers import PERSIS_STOP, STOP_TAG
from libensemble.tools.persistent_support import PersistentSupport


class Inbox:
    """A streaming simulator's messages from the manager: its rows, one per step, and the stop."""

    def __init__(self, ps: PersistentSupport, first_row: np.void) -> None:
        self.ps = ps
        self.rows: deque[np.void] = deque([first_row])
        self._stopped = False

    def stopped(self) -> bool:
        """Whether the manager has stopped this simulator; rows that came meanwhile are kept."""
        while not self._stopped and self.ps.comm.mail_flag():
            self._receive()
        return self._stopped

    def next_row(self) -> np.void | None:
        """The next row (waiting for it if it has not come yet); None once stopped."""
        while not self.rows and not self._stopped:
            self._receive()
        return self.rows.popleft() if self.rows else None

    def _receive(self) -> None:
        tag, _, calc_in = self.ps.recv()
        if tag in (STOP_TAG, PERSIS_STOP):
            self._stopped = True
        else:
            self.rows.append(calc_in[0])
