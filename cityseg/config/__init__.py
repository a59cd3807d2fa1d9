"""The experiment file: its schema (`models`), reading it (`loading`), its errors (`errors`).

`load_experiment(path, overrides)` is the front door: it reads, merges `base:` files, applies
`--set` overrides and validates before anything else happens, raising one ConfigError that
names the file and each bad field.
"""

from cityseg.config.errors import format_error, validation_error
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
    "DEFAULT_COMPONENTS", "REGISTRY_FIELDS", "SAVED", "Experiment", "InferenceConfig", "Section",
    "TrackingConfig", "TrainerConfig", "apply_overrides", "deep_merge", "flatten", "format_error",
    "load_experiment", "load_raw", "parse_override", "read_yaml", "to_yaml", "validate",
    "validation_error",
]
