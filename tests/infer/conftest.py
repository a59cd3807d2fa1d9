"""The trained run that the tests of evaluation, files and loading read."""

import pytest

from cityseg.config import load_experiment
from tests.conftest import QUICKSTART, tiny_overrides


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny binary training run shared by the tests that use it."""
    from cityseg.train import runner

    tmp_path = tmp_path_factory.mktemp("trained")
    exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=2),
                                       "tracking.log_model=false", "loss.pos_weight=4"])
    result = runner.run(exp)
    return tmp_path, result
