"""A tiny sweep over the shrunk quickstart, and the runs it leaves in MLflow."""


import yaml
from mlflow import MlflowClient

from cityseg.tracking import tracking_uri
from tests.conftest import QUICKSTART, tiny_overrides


def write_sweep(tmp_path, grid, **extra):
    """A tiny base experiment (the quickstart, shrunk, store in tmp_path) and a sweep over it."""
    base = {"base": str(QUICKSTART)}
    for override in [*tiny_overrides(tmp_path), "tracking.log_model=false"]:
        key, value = override.split("=", 1)
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "tiny", "base": "tiny.yaml", "metric": "val/dice", **extra,
             **({"grid": grid} if grid is not None else {})}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def runs(tmp_path):
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
    experiment = client.get_experiment_by_name("quickstart")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in found if r.data.tags.get("sweep_role") == "child"]
    return client, parents, children
