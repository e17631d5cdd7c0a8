"""The shared-memory transport: buffers as files on a tmpfs, tokens on a real Redis; what auto
and shm choose; and what is left behind (nothing)."""

from __future__ import annotations

import os
import pickle
import stat
import sys

import numpy as np
import pytest

from libe_cnn import codec, shm
from libe_cnn.owned_dirs import OWNER, mark_owned, remove_orphans
from libe_cnn.store import RunKey, TensorStore, run_keys
from tests.conftest import run_cli, small_tmpfs


@pytest.fixture
def shm_root(tmp_path, monkeypatch):
    """A directory standing in for /dev/shm (the connector needs nothing of tmpfs but files)."""
    where = tmp_path / "shm"
    where.mkdir()
    monkeypatch.setenv("LIBE_CNN_SHM", str(where))
    return where


def test_buffers_go_to_files_and_tokens_to_redis(redis_address, shm_root):
    directory = shm.create(shm.run_directory("run-s"))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    writer, reader = TensorStore(redis_address, "run-s", str(directory)), TensorStore(redis_address, "run-s", str(directory))
    arrays = [np.arange(1000, dtype=np.float32) * i for i in range(3)]
    keys = writer.put_many([(f"grad-{i}", a) for i, a in enumerate(arrays)]) + [writer.put(arrays[0])]
    writer.notify(["arrivals"], "grad-1")
    assert reader.next_tokens("arrivals", timeout=1) == ["grad-1"]
    # Only the token crossed Redis; the buffers are files of the run, readable by its user only.
    assert run_keys(redis_address, "run-s") == []
    files = sorted(p.name for p in directory.iterdir() if p.name != OWNER)
    assert files == sorted(k.split(":", 1)[1] for k in keys)  # none half written beside them
    assert all(stat.S_IMODE((directory / f).stat().st_mode) == 0o600 for f in files)
    got = reader.get_many(keys[:3])
    for array, want in zip(got, arrays):
        np.testing.assert_array_equal(array, want)
    assert not got[1].flags.writeable  # a view of the writer's pages, not a copy
    reader.evict(keys)
    assert [p.name for p in directory.iterdir()] == [OWNER]
    np.testing.assert_array_equal(got[2], arrays[2])  # a mapping outlives the name
    with pytest.raises(KeyError, match="missing"):
        reader.get(keys[0])
    writer.close()
    reader.close()
    shm.remove(directory)
    assert not directory.exists()


def test_hand_over_and_take_once_through_shared_memory(redis_address, shm_root):
    directory = shm.create(shm.run_directory("run-h"))
    sender, receiver = TensorStore(redis_address, "run-h", str(directory)), TensorStore(redis_address, "run-h", str(directory))
    sender.hand_over("act-0-1", np.full(7, 3, np.float32))
    np.testing.assert_array_equal(receiver.take("act-0-1", timeout=1), np.full(7, 3, np.float32))
    assert receiver.take("act-0-1", timeout=0.1) is None
    assert [p.name for p in directory.iterdir()] == [OWNER] and run_keys(redis_address, "run-h") == []
    sender.close()
    receiver.close()
    shm.remove(directory)


def test_a_pickle_or_another_runs_key_is_refused(redis_address, shm_root):
    directory = shm.create(shm.run_directory("run-p"))
    store = TensorStore(redis_address, "run-p", str(directory))
    (directory / "evil").write_bytes(pickle.dumps(np.ones(3)))
    with pytest.raises(codec.CodecError, match="bad magic"):
        store.get("run-p:evil")
    connector = shm.RunShmConnector(str(directory), "run-p")
    for key in ("run-q:x", "run-p:../owner", "run-p:.hidden", "run-p:"):
        with pytest.raises(KeyError, match="does not belong"):
            connector.get(RunKey(key))
    store.close()
    shm.remove(directory)


def test_only_the_directories_of_dead_runs_of_this_user_are_removed(shm_root):
    dead = shm.create(shm.run_directory("run-dead"))
    (dead / OWNER).write_text(f"{2**22 + 12345} {os.uname().nodename}\n")  # no such process
    alive = shm.create(shm.run_directory("run-alive"))  # this process
    elsewhere = shm.create(shm.run_directory("run-other-host"))
    (elsewhere / OWNER).write_text(f"{2**22 + 12345} some-other-host\n")
    unmarked = shm_root / f"{shm.PREFIX}unmarked"
    unmarked.mkdir()
    assert remove_orphans(shm_root, shm.PREFIX) == [dead]
    assert alive.exists() and elsewhere.exists() and unmarked.exists()
    if os.geteuid() == 0:  # another user's dead run is theirs to clean
        os.chown(elsewhere, 65534, 65534)
        (elsewhere / OWNER).write_text(f"{2**22 + 12345} {os.uname().nodename}\n")
        assert remove_orphans(shm_root, shm.PREFIX) == [] and elsewhere.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_too_little_shared_memory_falls_back_to_redis_or_refuses_shm(tmp_path, fashion_files):
    # As many containers give /dev/shm (64 MB), smaller still.
    with small_tmpfs(tmp_path / "tiny-shm", "16m") as where:
        env = {**os.environ, "LIBE_CNN_SHM": str(where)}
        options = ["-n", "2", "--dataset", "fashion-mnist", "--limit-train", "1024", "--max-steps", "2",
                   "--eval-every", "0", "--limit-test", "100"]
        refused = run_cli("run_libe_cnn.py", *options, "--transport", "shm", "--run-dir", str(tmp_path / "a"),
                          env=env, timeout=120)
        assert refused.returncode == 2 and not (tmp_path / "a").exists(), refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(f"error: --transport shm: {where} has 16 MB free and the run needs about ")
        assert line.endswith("MB there; use --transport redis")
        fallen = run_cli("run_libe_cnn.py", *options, "--run-dir", str(tmp_path / "b"), env=env, timeout=300)
        assert fallen.returncode == 0, fallen.stderr[-2000:]
        assert f"transport: redis, since {where} has 16 MB free" in fallen.stderr
        assert list(where.iterdir()) == []


def test_processes_on_several_hosts_use_redis(tmp_path, shm_root, capsys):
    from libe_cnn.config import TrainConfig
    from libe_cnn.errors import UserError
    from run_libe_cnn import choose_transport

    def cfg(transport: str) -> TrainConfig:
        return TrainConfig(dataset="iris", transport=transport, run_dir=str(tmp_path / "run"))

    one = cfg("auto")
    assert choose_transport(one, hosts=1, parameters=1_200_000) == str(shm_root / f"{shm.PREFIX}{one.run_id}")
    assert choose_transport(cfg("redis"), hosts=1, parameters=1_200_000) is None
    capsys.readouterr()
    assert choose_transport(cfg("auto"), hosts=2, parameters=1_200_000) is None
    assert capsys.readouterr().err == "transport: redis, since the run's processes are on 2 hosts\n"
    with pytest.raises(UserError, match="--transport shm: the run's processes are on 2 hosts; use --transport redis"):
        choose_transport(cfg("shm"), hosts=2, parameters=1_200_000)
