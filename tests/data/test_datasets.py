"""Dataset registry entries: each params model says where its samples are."""

import pytest

from cityseg.config import Experiment, load_experiment  # noqa: F401  (registers every dataset)
from cityseg.data.datasets import DataParams, data_index
from cityseg.data.synthetic import write_dataset
from cityseg.errors import ConfigError
from cityseg.registry import DATASETS
from tests.conftest import QUICKSTART


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_says_where_its_samples_are(name):
    assert DATASETS.get(name).params.index is not DataParams.index


def test_synthetic_scenes_are_indexed_in_the_layout_they_are_written_in(tmp_path):
    write_dataset(tmp_path, num_train=2, num_val=1, size=(16, 32), seed=0)
    params = DATASETS.get("synthetic").params(name="synthetic", root=tmp_path)
    index = data_index(params, ("val",))
    assert index.layout == "official" and index.layout_how == "given"
    assert len(index.samples["val"]) == 1


def test_cityscapes_is_indexed_in_its_configured_layout(tmp_path):
    write_dataset(tmp_path, num_train=2, num_val=1, size=(16, 32), seed=0, layout="folders")
    found = data_index(DATASETS.get("cityscapes").params(name="cityscapes", root=tmp_path),
                       ("train",))
    assert found.layout == "folders" and found.layout_how == "detected"
    given = DATASETS.get("cityscapes").params(name="cityscapes", root=tmp_path, layout="folders")
    assert data_index(given, ("train",)).layout_how == "given"


def test_num_workers_auto_shares_the_processs_cpus_among_the_machines_trainers(monkeypatch):
    from cityseg.data import workers

    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv(workers.SWEEP_JOBS_ENV, raising=False)
    # one process: 16 CPUs, one for the loop, at most 8 workers
    assert workers.loader_workers("auto") == 8 and workers.loader_workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc-per-node=4: 4 CPUs each
    assert workers.loader_workers("auto") == 3
    monkeypatch.setenv(workers.SWEEP_JOBS_ENV, "2")  # and two sweep workers: 2 CPUs each
    assert workers.loader_workers("auto") == 1
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1})
    assert workers.loader_workers("auto") == 0  # a share under one CPU: the loop loads itself
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv(workers.SWEEP_JOBS_ENV)
    assert workers.loader_workers("auto") == 1  # this machine's 2 cores: one worker
    exp = load_experiment(QUICKSTART)
    assert exp.data.num_workers == "auto" and exp.data.workers == 1
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_experiment(QUICKSTART, ["data.num_workers=-1"])
