"""Is B really better than A? Two runs scored on the same validation frames, paired frame by
frame: the difference of each region score (B - A) with a 95% bootstrap interval over frames,
every class's IoU delta, the frames where B loses and wins most.

Each resample draws frames with replacement (the same frames for A and B: paired) and
recomputes the DATASET-level score from the summed confusion counts, as validation and the
Cityscapes benchmark define it; the interval is SciPy's percentile bootstrap with a fixed seed,
so a report is reproducible. It measures data noise (which frames happen to be in the
validation set), not training noise (seeds); frames of one city are not independent draws, so
it is narrower than a fresh set of cities would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from cityseg import tracking
from cityseg.errors import CitysegError
from cityseg.metrics import CONFIDENCE, PER_FRAME, read_frame_counts, region_scores

RESAMPLES = 9999
SEED = 0  # the bootstrap's generator: the same runs give the same report
BATCH_CELLS = 20_000_000  # frames x resamples x cells summed at once (memory, ~160 MB)
SHOWN_FRAMES = 5  # where B loses most, and wins most


@dataclass
class Scored:
    """One run's per-frame record: frame names, counts[i, t, p], class names, epoch scored."""

    run_id: str
    name: str
    frames: list[str]
    counts: np.ndarray
    classes: list[str]
    epoch: int


def scored(root: Path, run, *, uri: str | None = None) -> Scored | None:
    """The run's eval/per_frame.npz, or None when it logged none (trained before cityseg
    kept per-frame counts)."""
    try:
        with tracking.downloaded(root, run.info.run_id, PER_FRAME, missing="", uri=uri) as path:
            frames, counts, classes, epoch = read_frame_counts(path)
    except CitysegError:
        return None
    return Scored(run.info.run_id, run.info.run_name or run.info.run_id[:8], frames, counts,
                  classes, epoch)


def pooled_record(records: list[Scored | None], name: str) -> Scored | None:
    """Several runs of one point (its seeds) as one record: each frame's counts summed over
    them, on the frames they all were scored on; None if any lacks a record."""
    if not records or any(r is None for r in records):
        return None
    shared = set.intersection(*(set(r.frames) for r in records))
    frames = [f for f in records[0].frames if f in shared]
    positions = [{f: i for i, f in enumerate(r.frames)} for r in records]
    counts = sum(r.counts[[at[f] for f in frames]] for r, at in zip(records, positions,
                                                                     strict=True))
    return Scored(records[0].run_id, name, frames, counts, records[0].classes,
                  records[0].epoch)


@dataclass
class Delta:
    """B - A for one score: the two dataset-level values, the difference and its interval."""

    name: str
    a: float
    b: float
    difference: float
    ci: tuple[float, float]

    @property
    def separable(self) -> bool:
        """The interval leaves out zero: the difference is more than the frames' noise."""
        return self.ci[0] > 0 or self.ci[1] < 0


@dataclass
class Pairing:
    """Everything `cityseg compare A B` says."""

    a: Scored
    b: Scored
    frames: int  # scored by both
    metric: str
    scores: list[Delta]  # the headline region scores, `metric` first
    classes: list[Delta] = field(default_factory=list)  # multiclass: per-class IoU, by size
    losses: list[tuple[str, float]] = field(default_factory=list)  # (frame, B - A), worst first
    wins: list[tuple[str, float]] = field(default_factory=list)  # (frame, B - A), best first

    @property
    def headline(self) -> Delta:
        return self.scores[0]

    def as_dict(self, config: dict[str, list[str]] | None = None) -> dict:
        """The comparison as one JSON-able object (`cityseg compare A B --json`)."""
        d = self.headline

        def delta(s: Delta) -> dict:
            return {"a": s.a, "b": s.b, "difference": s.difference, "ci": list(s.ci)}

        return {"metric": self.metric,
                "a": {"run_id": self.a.run_id, "name": self.a.name, "value": d.a,
                      "epoch": self.a.epoch},
                "b": {"run_id": self.b.run_id, "name": self.b.name, "value": d.b,
                      "epoch": self.b.epoch},
                "difference": d.difference, "ci": list(d.ci), "confidence": CONFIDENCE,
                "frames": self.frames, "separable": d.separable, "verdict": self.verdict(),
                "scores": {s.name: delta(s) for s in self.scores},
                "per_class": {s.name.removeprefix("val/iou/"): delta(s) for s in self.classes},
                "losses": [{"frame": f, "difference": v} for f, v in self.losses],
                "wins": [{"frame": f, "difference": v} for f, v in self.wins],
                "config": {k: {"a": v[0], "b": v[1]} for k, v in (config or {}).items()}}

    def verdict(self) -> str:
        d, name = self.headline, self.metric.removeprefix("val/")
        where = f"95% interval {d.ci[0]:+.4f}..{d.ci[1]:+.4f}, {self.frames} frames"
        if not d.separable:
            return f"within noise: B - A = {d.difference:+.4f} {name} ({where})"
        better, by = ("B", d.difference) if d.difference > 0 else ("A", -d.difference)
        return f"{better} is better by {by:.4f} {name} ({where})"


def region_metric(metric: str | None, classes: list[str]) -> str:
    """`metric` where it is a region score of these classes (what per-frame counts can
    recompute), else the task's headline one: val/dice, or val/miou for multiclass."""
    if metric is not None and metric.removeprefix("val/") in region_scores(
            np.zeros((len(classes), len(classes))), classes):
        return metric
    return "val/dice" if len(classes) == 2 else "val/miou"


def pair(a: Scored, b: Scored, *, metric: str | None = None,
         resamples: int = RESAMPLES) -> Pairing:
    """The paired comparison of two runs on the frames both were scored on, by `metric` (a
    region score; None: the task's headline one)."""
    metric = metric or region_metric(None, a.classes)
    if a.classes != b.classes:
        raise CitysegError(f"runs {a.run_id[:8]} and {b.run_id[:8]} score different classes "
                           f"({len(a.classes)} and {len(b.classes)}): nothing to pair")
    index_b = {name: i for i, name in enumerate(b.frames)}
    common = [(i, index_b[name]) for i, name in enumerate(a.frames) if name in index_b]
    if not common:
        raise CitysegError(f"runs {a.run_id[:8]} and {b.run_id[:8]} share no validation frame: "
                           f"they were scored on different data")
    ia, ib = (np.array(x) for x in zip(*common, strict=True))
    ca, cb = a.counts[ia], b.counts[ib]
    names = [a.frames[i] for i in ia]
    key = metric.removeprefix("val/")
    found_a, found_b = region_scores(ca.sum(0), a.classes), region_scores(cb.sum(0), a.classes)
    if key not in found_a:
        raise CitysegError(f"--metric {metric}: not a region score of these runs; choose one "
                           f"of {', '.join('val/' + k for k in found_a)}")
    keys = [key, *(k for k in found_a if k != key)]
    low, high = _interval(ca, cb, a.classes, keys, resamples=resamples)
    deltas = [Delta(f"val/{k}", float(found_a[k]), float(found_b[k]),
                    float(found_b[k] - found_a[k]), (float(lo), float(hi)))
              for k, lo, hi in zip(keys, low, high, strict=True)]
    scores = [d for d in deltas if not d.name.startswith("val/iou/")]
    classes = sorted((d for d in deltas if d.name.startswith("val/iou/")
                      and np.isfinite(d.difference)), key=lambda d: -abs(d.difference))
    # each frame's own score: where B loses and wins most
    per_a, per_b = region_scores(ca, a.classes)[key], region_scores(cb, a.classes)[key]
    change = np.nan_to_num(per_b - per_a)
    order = np.argsort(change, kind="stable")
    losses = [(names[i], float(change[i])) for i in order[:SHOWN_FRAMES] if change[i] < 0]
    wins = [(names[i], float(change[i])) for i in order[::-1][:SHOWN_FRAMES] if change[i] > 0]
    return Pairing(a=a, b=b, frames=len(common), metric=f"val/{key}", scores=scores,
                   classes=classes, losses=losses, wins=wins)


def _interval(ca: np.ndarray, cb: np.ndarray, classes: list[str], keys: list[str], *,
              resamples: int) -> tuple[np.ndarray, np.ndarray]:
    """The percentile bootstrap interval of each score's B - A, resampling frames (paired)."""

    def difference(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.moveaxis(index, axis, -1).astype(np.int64)
        sa, sb = ca[index].sum(-3), cb[index].sum(-3)  # (..., C, C) per resample
        found_a, found_b = region_scores(sa, classes), region_scores(sb, classes)
        return np.stack([found_b[k] - found_a[k] for k in keys])

    frames, cells = ca.shape[0], ca.shape[1] * ca.shape[2]
    if frames == 1:  # one frame: every resample is the frame itself
        same = difference(np.zeros((1, 1), dtype=np.int64))[:, 0]
        return same, same
    result = stats.bootstrap((np.arange(frames),), difference, vectorized=True, paired=True,
                             n_resamples=resamples, confidence_level=CONFIDENCE,
                             method="percentile", random_state=np.random.default_rng(SEED),
                             batch=max(1, BATCH_CELLS // (frames * cells)))
    low, high = result.confidence_interval
    return np.asarray(low), np.asarray(high)


def frames_panel(found: Pairing, root: Path, *, uri: str | None = None,
                 source: dict[str, str] | None = None) -> np.ndarray | None:
    """The frames B loses and wins most (input, ground truth, A's and B's prediction), as one
    picture; None when a model or the data is not on this machine. `source` maps a run id to
    the run whose checkpoint scored it (an evaluation's source run)."""
    from cityseg import viz
    from cityseg.data.datasets import data_index, frame_names, split_dataset
    from cityseg.infer.loading import load_trained

    names = [name for name, _ in (*found.losses, *found.wins)]
    if not names:
        return None
    source = source or {}
    try:
        models = [load_trained(run_id=source.get(s.run_id, s.run_id), checkpoint=None,
                               runs=root, uri=uri) for s in (found.a, found.b)]
        p = models[0].exp.data
        split = p.validation_split
        position = {n: i for i, n in enumerate(frame_names(data_index(p, (split,)), split))}
        dataset, _ = split_dataset(p, split)
    except CitysegError:
        return None
    found_frames = dataset.take([position[n] for n in names if n in position])
    if found_frames is None:
        return None
    images, masks = found_frames
    columns = {f"A {found.a.name} ({found.a.run_id[:8]})": models[0].predictor.predict(images),
               f"B {found.b.name} ({found.b.run_id[:8]})": models[1].predictor.predict(images)}
    return viz.comparison_panel(images.numpy(), masks.numpy(),
                                {k: v.cpu().numpy() for k, v in columns.items()},
                                task=models[0].task)
