"""How many processes feed a run's data: `data.num_workers: auto`.

A machine's CPUs are shared by every process that trains on it: the ranks torchrun started
there (LOCAL_WORLD_SIZE) and the workers of `cityseg sweep --jobs N` (which set
CITYSEG_SWEEP_JOBS for their children). Each process gets an equal share of the CPUs it may
run on (its affinity mask, which taskset, cgroup cpusets and Slurm narrow), keeps one core for
its own training loop and gives the rest to its DataLoader workers.
"""

from __future__ import annotations

import os

SWEEP_JOBS_ENV = "CITYSEG_SWEEP_JOBS"
MAX_AUTO_WORKERS = 8  # beyond it, more decoding processes cost memory and buy little


def available_cpus() -> int:
    """The CPUs this process may run on (not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_share() -> int:
    """This process's share of the available CPUs (at least one)."""
    sharers = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * int(os.environ.get(SWEEP_JOBS_ENV,
                                                                                "1"))
    return max(1, available_cpus() // max(1, sharers))


def loader_workers(num_workers: int | str) -> int:
    """data.num_workers as a count: `auto` is the process's CPU share less the core its
    training loop runs on (so a 2-core machine gets one worker, a 1-core share none)."""
    if num_workers != "auto":
        return int(num_workers)
    return min(MAX_AUTO_WORKERS, cpu_share() - 1)
