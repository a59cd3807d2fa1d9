"""Sweeps: one parent MLflow run, one child per point, the points chosen by an Optuna study.

One question per module; a newcomer reads run.py first:

- run.py: the entry point (`run_sweep`), the parent run and the result
- spec.py: the sweep file (grid, search ranges, pruning), loaded and validated
- study.py: the Optuna study (storages, distributions, re-queueing); the only optuna import
- worker.py: a worker claims a trial, finds earlier runs of its point, trains or resumes, reports
- summary.py: rows, ranking, and what goes to the parent run
- paired.py: is B really better than A? two runs paired frame by frame, with intervals
- seeds.py: a grid's `seed` key pooled: a row per point with n, mean and its interval
"""

from cityseg.sweep.run import SweepResult, open_tracker, parent_run, run_sweep, sweep_yaml
from cityseg.sweep.spec import (
    Plan,
    Prune,
    Range,
    Search,
    SweepConfig,
    SweepPoint,
    is_sweep_file,
    label_of,
    load_sweep,
)
from cityseg.sweep.study import default_storage, open_study
from cityseg.sweep.summary import comparison_panel, summary_rows
from cityseg.sweep.worker import ChildFailed, Duplicate, Worker

__all__ = [
    "ChildFailed", "Duplicate", "Plan", "Prune", "Range", "Search", "SweepConfig", "SweepPoint",
    "SweepResult", "Worker", "comparison_panel", "default_storage", "is_sweep_file", "label_of",
    "load_sweep",
    "open_study", "open_tracker", "parent_run", "run_sweep", "summary_rows", "sweep_yaml",
]
