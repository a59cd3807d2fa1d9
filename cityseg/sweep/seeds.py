"""Seeds pooled: a grid key `seed` is a repeat, not a setting. One row per point (the values of
the other keys) with n, mean, standard deviation, min, max and a 95% t-interval of each
metric over its seeds; points ranked by mean; the best told apart from the runner-up (or not)
by the per-seed differences of the two (the same seed: the same initial weights and data
order, so they pair).

The interval is Student's t over seeds (SciPy): training noise, which a sweep of one seed per
point cannot see. With n = 1 there is none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from cityseg.metrics import CONFIDENCE, t_interval
from cityseg.sweep.spec import Plan, yaml_value

SEED = "seed"


def pools_seeds(plan: Plan) -> bool:
    """Whether the grid repeats its points over seeds."""
    return plan.config.grid is not None and SEED in plan.keys


def pooled_rows(plan: Plan, rows: list[dict[str, Any]], metrics: list[str]
                ) -> list[dict[str, Any]]:
    """One row per point of the complete children's rows: the point's values, `n`, the seeds,
    and for the ranking metric `mean`, `std`, `min`, `max`, `ci_low`, `ci_high` (the other
    metrics' as `<metric>/mean` ...); ranked by mean."""
    points = [k for k in plan.keys if k != SEED]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["complete"] and isinstance(row.get(plan.config.metric), float):
            label = ", ".join(f"{k}={yaml_value(row.get(k))}" for k in points) or "all"
            groups.setdefault(label, []).append(row)
    pooled = []
    for label, group in groups.items():
        entry: dict[str, Any] = {"point": label, **{k: group[0].get(k) for k in points},
                                 "n": len(group), "seeds": [r.get(SEED) for r in group],
                                 "run_ids": [r["run_id"] for r in group]}
        for metric in metrics:
            values = [r[metric] for r in group if isinstance(r.get(metric), float)]
            if not values:
                continue
            low, high = t_interval(values)
            found = {"mean": float(np.mean(values)),
                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                     "min": min(values), "max": max(values), "ci_low": low, "ci_high": high}
            prefix = "" if metric == plan.config.metric else f"{metric}/"
            entry.update({f"{prefix}{k}": v for k, v in found.items()})
        pooled.append(entry)
    return sorted(pooled, key=lambda e: -e["mean"] if plan.config.mode == "max" else e["mean"])


@dataclass
class Separation:
    """The best point against the runner-up: the mean of their per-seed differences and its
    interval (seeds both trained), or Welch's interval when they share fewer than two."""

    best: str
    runner_up: str
    difference: float
    ci: tuple[float, float]
    paired_seeds: int

    @property
    def separable(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0

    def sentence(self, metric: str, mode: str) -> str:
        sign = 1 if mode == "max" else -1
        where = (f"95% interval {self.ci[0]:+.4f}..{self.ci[1]:+.4f} over "
                 + (f"{self.paired_seeds} paired seeds" if self.paired_seeds else "seeds"))
        if math.isnan(self.ci[0]):
            return (f"best {self.best}: {metric} {self.difference * sign:+.4f} against "
                    f"{self.runner_up}, one seed each: no interval")
        if self.separable:
            return (f"best {self.best} beats {self.runner_up} by {abs(self.difference):.4f} "
                    f"{metric} ({where})")
        return (f"best {self.best} is within noise of {self.runner_up}: "
                f"{self.difference:+.4f} {metric} ({where})")


def separation(plan: Plan, rows: list[dict[str, Any]], pooled: list[dict[str, Any]]
               ) -> Separation | None:
    """How sure the ranking's first place is; None with fewer than two points."""
    if len(pooled) < 2:
        return None
    metric = plan.config.metric
    by_run = {r["run_id"]: r for r in rows}
    first, second = pooled[0], pooled[1]
    seeds = [{by_run[i].get(SEED): by_run[i][metric] for i in p["run_ids"]}
             for p in (first, second)]
    shared = sorted(set(seeds[0]) & set(seeds[1]), key=str)
    if len(shared) >= 2:
        differences = [seeds[0][s] - seeds[1][s] for s in shared]
        low, high = t_interval(differences)
        return Separation(first["point"], second["point"], float(np.mean(differences)),
                          (low, high), len(shared))
    a, b = list(seeds[0].values()), list(seeds[1].values())
    difference = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Separation(first["point"], second["point"], difference, (math.nan, math.nan), 0)
    test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(CONFIDENCE)
    return Separation(first["point"], second["point"], difference, (float(low), float(high)), 0)
