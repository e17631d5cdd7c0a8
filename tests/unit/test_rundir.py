import errno
import json
import os

import pytest
import torch

from libe_cnn.errors import CannotWrite
from libe_cnn.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from libe_cnn.errors import UserError
from libe_cnn.rundir import MetricsLog, atomic_write


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CannotWrite, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_failed_write_that_torch_reports_as_a_runtime_error_names_its_os_error(tmp_path):
    # torch.save turns the OSError of a full disk into "RuntimeError: [enforce fail at inline_container.cc ...]".
    def torch_like(f):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 76736 vs 76688")

    with pytest.raises(CannotWrite, match="model.pt: No space left on device"):
        atomic_write(tmp_path / "model.pt", torch_like)
    with pytest.raises(ValueError):  # an error that is not about writing passes through as it is
        atomic_write(tmp_path / "model.pt", lambda f: int("x"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("binary", [True, False])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, binary):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~current_umask()
    path = tmp_path / "summary.json"
    for _ in range(2):  # a new file, then one replaced
        atomic_write(path, lambda f: f.write(b"{}" if binary else "{}"), binary=binary)
        assert path.stat().st_mode & 0o777 == expected  # not mkstemp's 0600


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_metrics_log_resumes_after_the_checkpointed_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write(step=step)
    assert log.lines == 5
    log.close()
    log = MetricsLog(path, keep=3)  # steps 4 and 5 came after the checkpoint: they are redone
    log.write(step=4)
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert log.lines == 4


def test_checkpoint_round_trip_and_damage(tmp_path):
    state = {"step": 7, "positions": [7, 7], "parent": {"w": torch.arange(4.0)}, "loss": float("nan")}
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded["step"] == 7 and loaded["positions"] == [7, 7] and torch.equal(loaded["parent"]["w"], torch.arange(4.0))
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(tmp_path)
    torch.save({"format": 99}, path)
    with pytest.raises(UserError, match="not a checkpoint of format"):
        load_checkpoint(tmp_path)
    path.unlink()
    with pytest.raises(UserError, match="has no checkpoint.pt"):
        load_checkpoint(tmp_path)
