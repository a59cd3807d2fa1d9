import math

import pytest
import torch

from cityseg.config import Experiment  # noqa: F401  (registers every optimizer and schedule)
from cityseg.optim import cosine_factor
from cityseg.registry import OPTIMIZERS, SCHEDULERS


def test_cosine_factor_by_hand():
    # 2 warm-up steps, then cosine over 8 steps from 1 to min_ratio 0.1
    assert cosine_factor(0, total=10, warmup=2, min_ratio=0.1) == pytest.approx(0.5)
    assert cosine_factor(1, total=10, warmup=2, min_ratio=0.1) == pytest.approx(1.0)
    assert cosine_factor(2, total=10, warmup=2, min_ratio=0.1) == pytest.approx(1.0)
    assert cosine_factor(6, total=10, warmup=2, min_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cosine_factor(10, total=10, warmup=2, min_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_schedule_steps_and_round_trips_its_state(name):
    model = torch.nn.Linear(2, 1)
    optimizer = OPTIMIZERS.build(OPTIMIZERS.get("adamw").params(name="adamw", lr=0.1), model)
    schedule = SCHEDULERS.build(SCHEDULERS.get(name).params(name=name), optimizer,
                                steps_per_epoch=3, epochs=4, mode="max")
    for _ in range(3):
        optimizer.step()
        schedule.after_step()
    schedule.after_epoch(0.5)
    state = schedule.state_dict()
    again = SCHEDULERS.build(SCHEDULERS.get(name).params(name=name), optimizer,
                             steps_per_epoch=3, epochs=4, mode="max")
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert 0 < optimizer.param_groups[0]["lr"] <= 0.1


def test_the_recorded_lr_is_the_configured_one_not_the_warm_ups_first():
    from cityseg.optim import describe_groups

    model = torch.nn.Linear(2, 1)
    optimizer = OPTIMIZERS.build(OPTIMIZERS.get("adamw").params(name="adamw", lr=3e-3), model)
    SCHEDULERS.build(SCHEDULERS.get("cosine").params(name="cosine", warmup_epochs=0.5),
                     optimizer, steps_per_epoch=10, epochs=4, mode="max")
    assert optimizer.param_groups[0]["lr"] < 3e-3  # the warm-up's first step
    (group,) = describe_groups(optimizer).values()
    assert group["lr"] == pytest.approx(3e-3)
