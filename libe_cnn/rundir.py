"""The run directory: metrics as JSON lines, and files written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from libe_cnn.errors import CannotWrite, os_error_in

if TYPE_CHECKING:
    import torch

# The umask can only be read by setting it, and it is process-global: read it once, at import,
# before the trainer starts threads, so no other thread can create a file while it is 0.
# A umask changed after import is not seen; nothing in libe-cnn changes it.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open(path, "w") gives a new file


# The first file of this process that could not be written. On a full disk the error that ends the
# run may be a later one (libEnsemble failing to save its history, say); this one says what happened.
_first_failure: list[CannotWrite] = []


def cannot_write(path, error: OSError) -> CannotWrite:
    """The CannotWrite for `path`, remembered if it is this process's first."""
    failure = CannotWrite(path, error.strerror or str(error))
    if not _first_failure:
        _first_failure.append(failure)
    return failure


def first_write_failure() -> CannotWrite | None:
    return _first_failure[0] if _first_failure else None


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through a temporary file in the same directory, then rename over `path`.

    A reader (or a crash) never sees a half-written file: a write that fails (a full disk)
    leaves the previous `path` as it was and raises CannotWrite, naming the path and the
    reason. The file gets FILE_MODE, as from a plain open(), not the 0600 of mkstemp.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from e
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        cause = os_error_in(e)
        if cause is not None:
            raise cannot_write(path, cause) from e
        raise


def save_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), binary=False)


def save_state_dict(path: Path, module: "torch.nn.Module") -> None:
    import torch  # here, so that `python -m libe_cnn plot` does not wait for torch

    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


class MetricsLog:
    """Appends one JSON object per line; flushed per line so a crash loses nothing written.

    `keep` (when resuming) first cuts the file to its first `keep` lines: the records after
    the checkpoint describe steps that are about to be taken again.
    """

    def __init__(self, path: Path, keep: int | None = None) -> None:
        self.lines = 0
        if keep is not None:
            kept = Path(path).read_text().splitlines(keepends=True)[:keep]
            atomic_write(path, lambda f: f.write("".join(kept)), binary=False)
            self.lines = len(kept)
        self._file = open(path, "a", buffering=1)

    def write(self, **record: Any) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise cannot_write(self._file.name, e) from e
        self.lines += 1

    def close(self) -> None:
        self._file.close()
