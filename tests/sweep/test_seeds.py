"""Seeds pooled: a grid's `seed` key is a repeat; one row per point with n, mean and a
t-interval, ranked by mean, and whether the best point is told apart from the runner-up."""

import json
import math
from pathlib import Path

import pytest

from cityseg.cli import main
from cityseg.metrics import t_interval
from cityseg.sweep import load_sweep
from cityseg.sweep.seeds import pooled_rows, pools_seeds, separation
from tests.sweep.tiny import runs, write_sweep


def test_the_t_interval_is_the_hand_worked_one():
    # mean 0.74, s = 0.04, sem = 0.04 / sqrt(3); t(0.975, df 2) = 4.302653
    low, high = t_interval([0.70, 0.74, 0.78])
    half = 4.302653 * 0.04 / math.sqrt(3)
    assert (low, high) == pytest.approx((0.74 - half, 0.74 + half), abs=1e-6)
    assert all(math.isnan(v) for v in t_interval([0.5]))
    assert t_interval([0.5, 0.5]) == (0.5, 0.5)


def rows_of(values: dict[tuple[float, int], float]) -> list[dict]:
    return [{"child": f"w{w}-s{s}", "run_id": f"{w}-{s}", "complete": True, "status": "FINISHED",
             "loss.pos_weight": w, "seed": s, "val/dice": v, "val/iou": v / 2}
            for (w, s), v in values.items()]


def test_points_are_pooled_over_seeds_ranked_by_mean_and_told_apart(tmp_path):
    plan = load_sweep(write_sweep(tmp_path, {"loss.pos_weight": [1, 8], "seed": [1, 2, 3]}))
    assert pools_seeds(plan)
    # weight 8 wins on every seed by 0.05 to 0.07: the paired differences leave out zero
    values = {(1, 1): 0.60, (1, 2): 0.66, (1, 3): 0.63, (8, 1): 0.66, (8, 2): 0.72, (8, 3): 0.69}
    rows = rows_of(values)
    pooled = pooled_rows(plan, rows, ["val/dice", "val/iou"])
    assert [p["point"] for p in pooled] == ["loss.pos_weight=8", "loss.pos_weight=1"]
    best = pooled[0]
    assert best["n"] == 3 and best["seeds"] == [1, 2, 3]
    assert best["mean"] == pytest.approx(0.69) and best["std"] == pytest.approx(0.03)
    assert (best["ci_low"], best["ci_high"]) == pytest.approx(t_interval([0.66, 0.72, 0.69]))
    assert best["val/iou/mean"] == pytest.approx(0.345)
    found = separation(plan, rows, pooled)
    assert found.paired_seeds == 3 and found.difference == pytest.approx(0.06)
    assert found.separable
    assert found.sentence("val/dice", "max").startswith(
        "best loss.pos_weight=8 beats loss.pos_weight=1 by 0.0600 val/dice (95% interval")
    # the same means, but the seeds disagree on which is better: within noise
    values.update({(8, 1): 0.58, (8, 2): 0.80, (8, 3): 0.69})
    rows = rows_of(values)
    found = separation(plan, rows, pooled_rows(plan, rows, ["val/dice"]))
    assert not found.separable and "within noise" in found.sentence("val/dice", "max")


@pytest.mark.slow  # six tiny children: about 40 s on two cores
def test_a_sweep_over_seeds_summarises_one_row_per_point(tmp_path, capsys):
    path = write_sweep(tmp_path, {"loss.pos_weight": [1, 8], "seed": [1, 2, 3]})
    assert main(["sweep", str(path), "--set", "trainer.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "seeds pooled (ranked by mean)" in out
    client, (parent,), children = runs(tmp_path)
    assert len(children) == 6
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json",
                                                        str(tmp_path))).read_text())
    table = dict(zip(summary["columns"], zip(*summary["data"], strict=True), strict=True))
    assert list(table["n"]) == [3, 3]
    for column in ("mean", "std", "ci_low", "ci_high", "val/iou/mean"):
        assert column in table, summary["columns"]
    assert sorted(table["loss/pos_weight"]) == [1, 8]
    assert "best_vs_runner_up" in parent.data.tags
    # its two best points paired frame by frame, seeds pooled: on the parent, and on demand
    (tmp_path / "c").mkdir()
    stated = json.loads(Path(client.download_artifacts(parent.info.run_id, "comparison.json",
                                                       str(tmp_path / "c"))).read_text())
    assert main(["compare", "--sweep", parent.data.tags["sweep_id"], "--best-two", "--json",
                 "--runs", str(tmp_path / "runs")]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert asked["difference"] == pytest.approx(stated["difference"])
    assert asked["ci"] == pytest.approx(stated["ci"]) and asked["frames"] == stated["frames"]
    assert {"plots/loss_pos_weight.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
