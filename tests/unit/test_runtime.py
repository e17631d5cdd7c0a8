import pytest

from libe_cnn.runtime import local_rank, select_device, threads_per_worker


@pytest.mark.parametrize("cores, n, expected", [(2, 1, 2), (2, 2, 1), (2, 4, 1), (64, 4, 16), (8, 3, 2)])
def test_threads_per_worker(cores, n, expected):
    assert threads_per_worker(cores, n) == expected


@pytest.mark.parametrize(
    "requested, rank, gpus, expected",
    [("auto", 0, 0, "cpu"), ("auto", 3, 0, "cpu"), ("auto", 0, 1, "cuda:0"), ("auto", 3, 1, "cuda:0"),
     ("auto", 3, 2, "cuda:1"), ("auto", 5, 4, "cuda:1"), ("cpu", 2, 4, "cpu"), ("cuda:1", 0, 4, "cuda:1")],
)
def test_select_device(requested, rank, gpus, expected):
    assert select_device(requested, rank, gpus) == expected


def test_local_rank_from_launcher(monkeypatch):
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert local_rank(default=7) == 7
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank(default=7) == 3


def test_manager_loop_priority_is_lowered_for_the_main_thread_only():
    import subprocess
    import sys

    code = (
        "import os, threading\n"
        "from libe_cnn.runtime import lower_manager_loop_priority\n"
        "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "own = []\n"
        "def gen():\n"
        "    lower_manager_loop_priority()\n"
        "    own.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))\n"
        "t = threading.Thread(target=gen); t.start(); t.join()\n"
        "print(os.getpriority(os.PRIO_PROCESS, threading.main_thread().native_id), own[0] == before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["19", "True"]


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_workers_on_a_node_spread_evenly_over_its_gpus(gpus):
    devices = [select_device("auto", rank, gpus) for rank in range(2 * gpus)]
    assert sorted(set(devices)) == [f"cuda:{g}" for g in range(gpus)]
    assert all(devices.count(d) == 2 for d in set(devices))
