"""Dataset registry entries: each params model says where its samples are."""

import pytest

from cityseg.config import Experiment, load_experiment  # noqa: F401  (registers every dataset)
from cityseg.data.datasets import DataParams, data_index
from cityseg.data.synthetic import write_dataset
from cityseg.registry import DATASETS


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
