"""What DataLoaders are made of: the share of the CPUs `data.num_workers: auto` takes, the
epoch sampler that gives each process its share of the same global batches, and the frames of
sample panels."""

import pytest

from cityseg.config import load_experiment
from cityseg.data import loader
from cityseg.data.loader import EpochSampler
from cityseg.errors import ConfigError
from tests.conftest import QUICKSTART


def test_num_workers_auto_shares_the_processs_cpus_among_the_machines_trainers(monkeypatch):
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv(loader.SWEEP_JOBS_ENV, raising=False)
    # one process: 16 CPUs, one for the loop, at most 8 workers
    assert loader.loader_workers("auto") == 8 and loader.loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node=4: 4 CPUs each
    assert loader.loader_workers("auto") == 3
    monkeypatch.setenv(loader.SWEEP_JOBS_ENV, "2")  # and two sweep workers: 2 CPUs each
    assert loader.loader_workers("auto") == 1
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1})
    assert loader.loader_workers("auto") == 0  # a share under one CPU: the loop loads itself
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv(loader.SWEEP_JOBS_ENV)
    assert loader.loader_workers("auto") == 1  # this machine's 2 cores: one worker
    exp = load_experiment(QUICKSTART)
    assert exp.data.num_workers == "auto" and exp.data.workers == 1
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_experiment(QUICKSTART, ["data.num_workers=-1"])


def test_each_rank_takes_its_share_of_the_same_global_batches():
    one = list(EpochSampler(10, seed=3, shuffle=True, batch_size=4))
    ranks = [list(EpochSampler(10, seed=3, shuffle=True, batch_size=4, rank=r, world=2))
             for r in range(2)]
    # per step, rank 0's two samples then rank 1's are the one-process batch
    assert ranks[0][:2] + ranks[1][:2] == one[:4] and ranks[0][2:4] + ranks[1][2:4] == one[4:8]
    assert ranks[0][4:] + ranks[1][4:] == one[8:]  # the last, partial batch split evenly
    three = [list(EpochSampler(10, seed=3, shuffle=True, batch_size=3, rank=r, world=3))
             for r in range(3)]
    assert [len(r) for r in three] == [3, 3, 3]  # 10 = 3 x 3 + 1: the odd sample is left out
    resumed = EpochSampler(10, seed=3, shuffle=True, batch_size=4, rank=1, world=2)
    resumed.set_epoch(1, start_batch=1)
    assert list(resumed) == ranks[1][2:] and len(resumed) == 3


def test_sample_panels_take_frames_spread_over_the_split_not_its_first():
    # validation frames sorted by name are one video's (or one city's) in a row
    assert loader.spaced(30, 4) == [0, 7, 15, 22]
    assert loader.spaced(10, 4) == [0, 2, 5, 7]
    assert loader.spaced(3, 4) == [0, 1, 2] and loader.spaced(5, 0) == []
    for length in range(1, 40):
        for count in range(1, length + 1):
            found = loader.spaced(length, count)
            gaps = {b - a for a, b in zip(found, found[1:], strict=False)}
            assert len(set(found)) == count and max(found) < length
            assert not gaps or max(gaps) - min(gaps) <= 1  # as even as whole steps allow
