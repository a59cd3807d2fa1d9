"""The experiment file. One question per module:

- models.py: what may an experiment say? (its Pydantic schema, components from the registries)
- loading.py: how is it read? (YAML, `base:` merges, `--set` overrides, validation)
- errors.py: what is wrong with it, said as one ConfigError naming file and field
- identity.py: is it the same run or sweep point? (config hashes, what a resumed run may change)

`load_experiment(path, overrides)` is the front door: it reads, merges `base:` files, applies
`--set` overrides and validates before anything else happens, raising one ConfigError that
names the file and each bad field.
"""

from cityseg.config.errors import format_error, validation_error
from cityseg.config.identity import (
    RESUMABLE_CHANGES,
    RUN_PARAMS,
    config_hash,
    legacy_config_hash,
    run_params,
    unresumable_changes,
)
from cityseg.config.loading import (
    apply_overrides,
    deep_merge,
    flatten,
    load_experiment,
    load_raw,
    parse_override,
    read_yaml,
    to_yaml,
    validate,
)
from cityseg.config.models import (
    DEFAULT_COMPONENTS,
    REGISTRY_FIELDS,
    SAVED,
    Experiment,
    InferenceConfig,
    Section,
    TrackingConfig,
    TrainerConfig,
)

__all__ = [
    "RESUMABLE_CHANGES", "RUN_PARAMS", "config_hash", "legacy_config_hash", "run_params",
    "unresumable_changes",
    "DEFAULT_COMPONENTS", "REGISTRY_FIELDS", "SAVED", "Experiment", "InferenceConfig", "Section",
    "TrackingConfig", "TrainerConfig", "apply_overrides", "deep_merge", "flatten", "format_error",
    "load_experiment", "load_raw", "parse_override", "read_yaml", "to_yaml", "validate",
    "validation_error",
]
