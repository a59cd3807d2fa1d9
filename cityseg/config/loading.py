"""Reading experiment files: YAML, `base:` inheritance, `--set` overrides, then validation.

`load_experiment(path, overrides)` reads YAML, merges `base:` files, applies overrides and
validates everything before anything else happens. Every problem becomes one ConfigError that
names the file and the dotted path of each bad field, with a suggestion where one is close.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cityseg.config.errors import validation_error
from cityseg.config.models import DEFAULT_COMPONENTS, REGISTRY_FIELDS, Experiment
from cityseg.errors import ConfigError
from cityseg.registry import Registry


def read_yaml(path: Path, *, included_by: Path | None = None) -> dict:
    """The file's top-level mapping; a ConfigError if it is missing, broken, empty or a list."""
    what = f"base file (included by {included_by})" if included_by else "experiment file"
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    if content is None:
        raise ConfigError(f"{path}: file is empty; an experiment needs at least `name` and `data`")
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, "
                          f"got a {type(content).__name__}")
    return content


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) replaces the base value."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The file's mapping with its `base:` chain merged under it (paths relative to the file)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise ConfigError(f"{path}: `base` inheritance forms a cycle: {cycle}")
    content = read_yaml(path, included_by=_chain[-1] if _chain else None)
    base = content.pop("base", None)
    if base is None:
        return content
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to a YAML file, got {base!r}")
    inherited = load_raw(path.parent / base, (*_chain, resolved))
    for key, registry in REGISTRY_FIELDS.items():  # a file naming another component switches it
        section, new = inherited.get(key), content.get(key)
        if isinstance(section, dict) and isinstance(new, dict) and "name" in new:
            _switch_component(section, registry, new["name"])
    return deep_merge(inherited, content)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c) with c parsed as a YAML scalar or flow collection."""
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", key):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, "
                          f"e.g. trainer.epochs=3")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: value is not valid YAML") from None
    return key.split("."), parsed


def _switch_component(section: dict, registry: Registry, new_name: Any) -> None:
    """Switching a component's `name` keeps only the keys the new component accepts.

    Like choosing another config group in Hydra: `--set loss.name=dice`, or a file whose base
    has a weighted_bce loss saying `loss: {name: dice}`, drops pos_weight instead of failing on
    it; an unknown name is left for validation.
    """
    if new_name == section.get("name") or not isinstance(new_name, str) or new_name not in registry:
        return
    accepted = registry.get(new_name).params.model_fields
    for key in [k for k in section if k not in accepted]:
        del section[key]


def _list_index(items: list, key: str, text: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"--set {text}: {key!r} is not an index of a {len(items)}-item list")
    return int(key)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each dotted key (list items by index: augment.0.p=1) after merging, before validation."""
    for text in overrides:
        keys, value = parse_override(text)
        registry = REGISTRY_FIELDS.get(keys[0])
        is_component = keys[-1] == "name" and len(keys) == (3 if keys[0] == "augment" else 2)
        node: Any = raw
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, key, text)]
            else:
                if not isinstance(node.get(key, {}), (dict, list)):
                    raise ConfigError(f"--set {text}: {'.'.join(keys[:depth + 1])} is a value, "
                                      f"not a section")
                # a component section the file leaves to its default starts as that default
                node = node.setdefault(key, {"name": DEFAULT_COMPONENTS[key]}
                                       if depth == 0 and key in DEFAULT_COMPONENTS else {})
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, text)] = value
        else:
            if registry is not None and is_component:
                _switch_component(node, registry, value)
            node[last] = value
    return raw


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read, merge, override and validate an experiment; raises ConfigError on any problem."""
    raw = apply_overrides(load_raw(Path(path)), overrides)
    return validate(raw, source=str(path))


def validate(raw: dict, *, source: str) -> Experiment:
    """The experiment `raw` describes; a ConfigError naming `source` and every bad field."""
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        raise validation_error(err, raw, source=source) from None


def to_yaml(experiment: Experiment) -> str:
    """The fully resolved experiment as YAML; loading it again gives the same experiment."""
    return yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}; lists stay whole ('[1, 2]'), augment items by index."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        return flatten({str(i): v for i, v in enumerate(tree)}, prefix)
    return {prefix[:-1]: str(tree)}
