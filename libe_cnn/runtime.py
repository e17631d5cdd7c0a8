"""Per-process compute placement: the thread budget and the device of each process."""

from __future__ import annotations

import contextlib
import os
import threading

import psutil
import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(cores: int, n_workers: int) -> int:
    """An even share of the cores for each simulator, at least one (no oversubscription)."""
    return max(1, cores // n_workers)


def rss_mb() -> float:
    """This process's resident memory in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once, before any parallel work
        pass


@contextlib.contextmanager
def all_cores():
    """Compute with every core for a while (then with the threads set before)."""
    before = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_device(requested: str, local_rank: int, gpu_count: int) -> str:
    """The device of one process: `auto` spreads simulators over the node's GPUs by local rank."""
    if requested == "auto":
        return f"cuda:{local_rank % gpu_count}" if gpu_count > 0 else "cpu"
    return requested


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# Variables in which MPI launchers and Slurm give a process its rank on its node.
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def local_rank(default: int) -> int:
    """This process's rank on its node, from the launcher; `default` when not launched by one."""
    for var in LOCAL_RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return default


def lower_manager_loop_priority() -> None:
    """Give the libEnsemble manager's polling loop the lowest CPU priority.

    The manager polls its workers in a tight loop. While the simulators compute, that loop
    takes a share of their cores (on 2 cores it slowed each step by ~20%); at nice 19 it
    runs only on otherwise idle cycles, which is exactly when the simulators wait for it.
    Called from the generator's thread, it lowers the manager's main thread only (Linux
    priorities are per thread), so the generator's own work keeps its priority.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.main_thread().native_id, 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: run unchanged
        pass


def check_device(flag: str, device: str) -> None:
    """A GPU named by `flag` must exist on this node.

    Raises:
        UserError: naming the option and what this node has.
    """
    from libe_cnn.errors import UserError

    if not device.startswith("cuda"):
        return
    count = gpu_count()
    if count == 0:
        raise UserError(f"{flag} {device}: no GPU is visible on this node; use {flag} cpu (or auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise UserError(f"{flag} {device}: this node has {count} GPU{'s' if count > 1 else ''} "
                        f"(cuda:0 to cuda:{count - 1})")


def available_memory() -> int:
    """Bytes this process's children may still allocate: the machine's, or less where a cgroup
    (a batch job's, a container's) sets a lower limit."""
    available = psutil.virtual_memory().available
    cgroup = _cgroup_headroom()
    return min(available, cgroup) if cgroup is not None else available


def _cgroup_headroom() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1) minus what it holds, page cache that
    can be dropped not counted; None where there is no limit or no cgroup to read."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            base, limit_file, usage_file, cache_key = "/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            base, limit_file, usage_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_key = "total_inactive_file"
        else:
            continue
        directory = os.path.join(base, path.lstrip("/"))
        try:
            limit = open(os.path.join(directory, limit_file)).read().strip()
            usage = int(open(os.path.join(directory, usage_file)).read())
            stat = dict(row.split() for row in open(os.path.join(directory, "memory.stat")).read().splitlines())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # no limit (v1 writes its largest page-aligned value)
            continue
        return max(0, int(limit) - usage + int(stat.get(cache_key, 0)))
    return None


def process_memory() -> tuple[int, int]:
    """(private, shared) resident bytes of this process: what another process like it would add
    (its anonymous memory), and the pages of files it maps, which such a process would share.

    Not USS: a file page counts as unique while no other process maps it, so USS would change
    with whatever else runs on the machine."""
    info = psutil.Process().memory_info()
    return info.rss - info.shared, info.shared
