"""Is B really better? The paired bootstrap against cases whose answer is known, and the
batched region scores against the scalar ones validation logs."""

import json
import re

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.data.tasks import TASKS
from cityseg.metrics import region_scores
from cityseg.sweep.paired import Scored, pair
from cityseg.tracking import tracking_uri
from cityseg.train import runner
from tests.conftest import NO_MODEL, QUICKSTART, tiny_overrides

BINARY, MULTICLASS = TASKS["binary"], TASKS["multiclass"]


def frames_of(counts: np.ndarray, name: str = "a") -> Scored:
    classes = list(BINARY.class_names if counts.shape[-1] == 2 else MULTICLASS.class_names)
    return Scored(run_id=name * 8, name=name, frames=[f"f{i:03d}.png" for i in range(len(counts))],
                  counts=counts, classes=classes, epoch=1)


def binary_frames(rng: np.random.Generator, n: int, *, tp_shift: int = 0) -> np.ndarray:
    """n frames of 2x2 counts: [[tn, fp], [fn, tp]]; tp_shift moves pixels from fn to tp."""
    tp = rng.integers(50, 200, n)
    fn = rng.integers(20, 80, n)
    fp = rng.integers(10, 60, n)
    tn = rng.integers(5000, 9000, n)
    shift = np.minimum(tp_shift, fn)
    return np.stack([np.stack([tn, fp], -1), np.stack([fn - shift, tp + shift], -1)], -2)


@pytest.mark.parametrize("task", [BINARY, MULTICLASS], ids=["binary", "multiclass"])
def test_batched_region_scores_equal_the_scalar_ones_validation_logs(task):
    rng = np.random.default_rng(0)
    n = task.num_classes
    for _ in range(20):
        counts = rng.integers(0, 1000, (n, n))
        counts[rng.integers(0, n)] = 0  # a class absent from ground truth...
        counts[:, rng.integers(0, n)] = 0  # ...and one from the predictions
        scalar = task.scores(torch.from_numpy(counts))
        batched = region_scores(counts[None], task.class_names)
        shown = {k: v[0] for k, v in batched.items() if np.isfinite(v[0])}
        assert shown.keys() == scalar.keys()
        for key, value in scalar.items():
            assert shown[key] == pytest.approx(value, abs=1e-12), key


def test_identical_runs_differ_by_exactly_zero_and_the_interval_holds_zero():
    counts = binary_frames(np.random.default_rng(1), 40)
    found = pair(frames_of(counts, "a"), frames_of(counts.copy(), "b"), metric="val/dice",
                 resamples=999)
    assert found.frames == 40 and found.headline.difference == 0.0
    assert found.headline.ci[0] <= 0.0 <= found.headline.ci[1]
    assert not found.headline.separable and found.verdict().startswith("within noise")
    assert found.losses == [] and found.wins == []


def test_a_run_better_on_every_frame_has_an_interval_above_zero():
    rng = np.random.default_rng(2)
    a = binary_frames(rng, 30)
    b = a.copy()
    b[:, 1, 1] += 15  # every frame: 15 missed pixels found
    b[:, 1, 0] -= 15
    found = pair(frames_of(a, "a"), frames_of(b, "b"), metric="val/dice", resamples=999)
    d = found.headline
    assert d.difference > 0 and d.ci[0] > 0 and d.separable
    assert found.verdict().startswith(f"B is better by {d.difference:.4f} dice (95% interval")
    # the dataset-level values are those of the summed counts, as validation computes them
    assert d.a == pytest.approx(BINARY.scores(torch.from_numpy(a.sum(0)))["dice"], abs=1e-12)
    assert d.b == pytest.approx(BINARY.scores(torch.from_numpy(b.sum(0)))["dice"], abs=1e-12)
    assert found.losses == [] and len(found.wins) == 5


def test_frames_are_paired_by_name_and_the_biggest_changes_listed():
    rng = np.random.default_rng(3)
    a = binary_frames(rng, 12)
    b = a.copy()
    b[4, 1, 1] -= 40  # frame 4: B misses 40 pixels A found
    b[4, 1, 0] += 40
    b[7, 1, 1] += 30  # frame 7: B finds 30 A missed
    b[7, 1, 0] -= 30
    first, second = frames_of(a, "a"), frames_of(b, "b")
    # B's record lists its frames in another order, and one frame A has not
    order = np.r_[rng.permutation(12), 0]
    second.frames = [second.frames[i] if k < 12 else "other.png" for k, i in enumerate(order)]
    second.counts = b[order]
    found = pair(first, second, metric="val/dice", resamples=999)
    assert found.frames == 12
    assert [name for name, _ in found.losses] == ["f004.png"]
    assert [name for name, _ in found.wins] == ["f007.png"]


def test_multiclass_lists_every_class_delta_by_size():
    rng = np.random.default_rng(4)
    n = MULTICLASS.num_classes
    a = rng.integers(0, 50, (20, n, n)) + np.eye(n, dtype=np.int64) * 500
    b = a.copy()
    b[:, 13, 13] += 200  # car found more often
    found = pair(frames_of(a, "a"), frames_of(b, "b"), metric="val/miou", resamples=199)
    assert found.metric == "val/miou" and found.headline.difference > 0
    assert found.classes[0].name == "val/iou/car" and found.classes[0].ci[0] > 0
    assert len(found.classes) == n


def test_compare_a_b_pairs_two_runs_frame_by_frame(tmp_path, capsys):
    ids = []
    for weight in (1, 8):  # trained enough (3 epochs of 6 steps) for the weight to matter
        exp = load_experiment(QUICKSTART, [
            *tiny_overrides(tmp_path, epochs=3), NO_MODEL, "data.num_val=12",
            "data.num_train=24", "data.batch_size=4", "model.base_channels=8",
            "optimizer.lr=0.01", f"loss.pos_weight={weight}"])
        ids.append(runner.run(exp).run_id)
    runs = str(tmp_path / "runs")
    assert main(["compare", ids[0][:8], ids[1][:8], "--runs", runs, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    logged = []  # each run's val/dice at its best epoch, as validation logged it
    for run_id in ids:
        best = int(client.get_run(run_id).data.tags["best_epoch"])
        logged += [m.value for m in client.get_metric_history(run_id, "val/dice")
                   if m.step == best]
    # the dataset-level values from the summed per-frame counts are validation's own
    assert (found["a"]["value"], found["b"]["value"]) == pytest.approx(logged, abs=1e-12)
    assert found["difference"] == pytest.approx(logged[1] - logged[0], abs=1e-12)
    low, high = found["ci"]
    assert low <= found["difference"] <= high, found
    assert found["config"] == {"loss.pos_weight": {"a": "1.0", "b": "8.0"}}
    # "B loses most": the frames whose own dice fell most, recomputed from the records
    records = []
    for run_id in ids:
        (tmp_path / run_id).mkdir()
        with np.load(client.download_artifacts(run_id, "eval/per_frame.npz",
                                               str(tmp_path / run_id))) as record:
            records.append({k: record[k] for k in ("frames", "counts")})
    assert found["frames"] == len(records[0]["frames"]) == len(records[1]["frames"])
    change = {}
    for (name, ca), cb in zip(zip(records[0]["frames"], records[0]["counts"], strict=True),
                              records[1]["counts"], strict=True):
        dice = [BINARY.scores(torch.from_numpy(c))["dice"] for c in (ca, cb)]
        change[str(name)] = dice[1] - dice[0]
    worst = sorted((v, k) for k, v in change.items() if v < 0)[:5]
    assert worst and found["difference"] != 0, (change, found)  # the weights trained two models
    assert [x["frame"] for x in found["losses"]] == [k for _, k in worst]
    # the table, in the terminal
    assert main(["compare", ids[0], ids[1], "--runs", runs]) == 0
    out = capsys.readouterr().out
    assert "val/dice" in out and found["verdict"] in out.replace("\n", " ")
    # the frames B loses and wins most, as a picture (a row each), into --out and run B
    listed = len(found["losses"]) + len(found["wins"])
    assert main(["compare", ids[0], ids[1], "--runs", runs, "--out", str(tmp_path / "c"),
                 "--log"]) == 0
    stem = f"compare_{ids[0][:8]}_{ids[1][:8]}"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [f"{stem}.json", f"{stem}.png"]
    with Image.open(tmp_path / "c" / f"{stem}.png") as picture:
        assert picture.height > listed * 32  # a row per frame, each at least the frame's size
    logged_files = {a.path for a in client.list_artifacts(ids[1], f"compare/{ids[0][:8]}")}
    assert logged_files == {f"compare/{ids[0][:8]}/{stem}.json",
                            f"compare/{ids[0][:8]}/{stem}.png"}
    capsys.readouterr()
    # a side may pool several runs (one setting's seeds): a run pooled with itself counts each
    # frame twice, which leaves every ratio, and so the comparison, as it was
    assert main(["compare", f"{ids[0]},{ids[0][:8]}", f"{ids[1]},{ids[1]}", "--runs", runs,
                 "--json"]) == 0
    doubled = json.loads(capsys.readouterr().out)
    assert doubled["a"]["name"].endswith("(n=2)") and doubled["frames"] == found["frames"]
    assert doubled["difference"] == pytest.approx(found["difference"], abs=1e-12)
    assert doubled["ci"] == pytest.approx(found["ci"])
    assert doubled["per_run"]["A"] == pytest.approx([logged[0]] * 2, abs=1e-12)
    assert doubled["per_run"]["B"] == pytest.approx([logged[1]] * 2, abs=1e-12)
    assert main(["compare", f"{ids[0]},{ids[0]}", ids[1], "--runs", runs]) == 0
    assert re.search(r"A's runs, val/dice each \(best epoch\): [\d.]+, [\d.]+; mean",
                     capsys.readouterr().out.replace("\n", " "))
    # `evaluate` keeps each frame's counts too: two evaluations pair as their runs did
    evaluations = []
    for run_id in ids:
        assert main(["evaluate", "--run", run_id, "--runs", runs]) == 0
        evaluations.append(re.search(r"logged as MLflow run (\w+)", capsys.readouterr().out)[1])
    assert main(["compare", *evaluations, "--runs", runs, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["a"]["value"], again["b"]["value"]) == pytest.approx(logged, abs=1e-12)
    assert again["ci"] == pytest.approx(found["ci"]) and again["frames"] == found["frames"]


def test_compare_a_b_of_runs_without_per_frame_counts_says_so(tmp_path, capsys):
    ids = []
    for weight in (1, 4):
        exp = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path, epochs=1), NO_MODEL,
                                           f"loss.pos_weight={weight}"])
        ids.append(runner.run(exp).run_id)
    for record in (tmp_path / "runs" / "artifacts").rglob("per_frame.npz"):
        record.unlink()  # as a run trained before cityseg kept them
    assert main(["compare", *ids, "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "kept no per-frame counts" in out and "with no interval" in out
    assert main(["compare", ids[0], "--runs", str(tmp_path / "runs")]) == 2
    assert "compare takes two runs to pair" in capsys.readouterr().err
