"""Config identity: which experiments are "the same run" (the resume hash), the same sweep
point (the whole hash), and what may change between a checkpoint and the run that resumes it."""

from __future__ import annotations

import hashlib
import json

from pydantic import ValidationError

from cityseg.config.loading import flatten
from cityseg.config.models import SAVED, Experiment

# what may differ between a checkpoint and its resumed run: the length of training, how often
# it checkpoints, the words describing it, and where things live on the machine that resumes it
# (the same data at another path, another cache, another tracking dir or server)
RESUMABLE_CHANGES = {"trainer.epochs", "trainer.checkpoint_minutes", "description",
                     "tracking.uri", "tracking.upload_checkpoints", "tracking.dir",
                     "data.root", "data.cache_dir", "data.num_workers"}


def config_hash(exp: Experiment, *, resumable: bool = True) -> str:
    """Identity of an experiment's config: for resuming (ignoring what a resumed run may
    change, such as the epoch count), or whole (resumable=False: sweep points).

    Only values that differ from the schema's defaults count (and which component each section
    names), so an upgrade that adds a key with a default keeps every hash: `--resume auto` still
    finds older runs and a sweep keeps its id."""
    full = flatten(exp.model_dump(mode="json"))
    chosen = flatten(exp.model_dump(mode="json", exclude_defaults=True))
    ignored = RESUMABLE_CHANGES if resumable else set()
    kept = {k: v for k, v in full.items()
            if (k in chosen or k.rpartition(".")[2] == "name") and k not in ignored}
    return _digest(kept)


def legacy_config_hash(exp: Experiment) -> str:
    """The resume hash of cityseg 0.1 before the hash above (every key, defaults included):
    the tag of runs trained by it, so that `--resume auto` finds them too."""
    kept = {k: v for k, v in flatten(exp.model_dump(mode="json")).items()
            if k not in RESUMABLE_CHANGES}
    return _digest(kept)


def _digest(flat: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _as_now(config: dict) -> dict:
    """A saved config as this version reads it: keys added since it was saved take their
    defaults, so a checkpoint from before an upgrade still resumes (unless it no longer
    validates: then as it was, and the differences are named)."""
    try:
        return Experiment.model_validate(config, context={SAVED: True}).model_dump(mode="json")
    except ValidationError:  # a removed or renamed key: compared raw
        return config


def unresumable_changes(saved: dict, exp: Experiment) -> dict[str, tuple[str, str]]:
    """The keys, sorted, whose values differ between a checkpoint's saved config and `exp`
    beyond RESUMABLE_CHANGES: {key: (saved value, value now)}, "(absent)" where one lacks it."""
    was, now = flatten(_as_now(saved)), flatten(exp.model_dump(mode="json"))
    return {k: (was.get(k, "(absent)"), now.get(k, "(absent)"))
            for k in sorted(was.keys() | now.keys())
            if was.get(k) != now.get(k) and k not in RESUMABLE_CHANGES}


# the params a run is logged with in MLflow: the knobs users tell runs apart by. MLflow heads
# every sample-image card with all of a run's params, so the whole config (config.yaml, an
# artifact) would push the picture out of its card; the epoch count is left out (a resumed run
# may change it and params are immutable: the run's config.yaml and its tag say it)
RUN_PARAMS = ("seed", "model.encoder", "model.depth", "loss.pos_weight", "optimizer.lr")


def run_params(exp: Experiment, also: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """RUN_PARAMS and the keys in `also` (a sweep's swept keys) as `exp` sets them; a key
    whose value is None (no encoder) is left out."""
    full = flatten(exp.model_dump(mode="json"))
    return {k: full[k] for k in dict.fromkeys((*RUN_PARAMS, *also))
            if k in full and full[k] != "None"}
