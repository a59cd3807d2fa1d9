"""Reading experiment files: YAML, `base:` inheritance, `--set` overrides, then validation.

`load_experiment(path, overrides)` reads YAML (safe, and within budgets of nesting and alias
expansion), merges `base:` files, applies overrides and validates everything before anything
else happens. Every problem becomes one ConfigError that names the file and the dotted path of
each bad field (or the line, for YAML), with a suggestion where one is close.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cityseg.config.errors import validation_error
from cityseg.config.models import DEFAULT_COMPONENTS, REGISTRY_FIELDS, SAVED, Experiment
from cityseg.errors import ConfigError
from cityseg.registry import Registry

YAML_MAX_DEPTH = 64  # nested collections: experiments nest 4 deep; each level costs the
# composer a few Python frames, and a 10,000-level file would exhaust the recursion limit
YAML_MAX_BYTES = 1 << 20  # read whole before parsing: experiments are a few kB
YAML_MAX_VALUES = 100_000  # values with every alias written out: experiments hold a few
# hundred, while a 400-byte alias bomb expands to billions that validation would walk


BASE_MAX_DEPTH = 32  # files in one `base:` chain: experiments use one or two


class YAMLOverBudget(yaml.MarkedYAMLError):
    """A document nested deeper, or expanding to more values, than an experiment can need."""


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that names one key twice (YAML itself would keep the last silently)."""


class BoundedLoader(yaml.SafeLoader):
    """safe_load that counts, while composing, each value's size with its aliases expanded.

    The count stops a document before anything is built from it: nesting past YAML_MAX_DEPTH
    (before Python's recursion limit) or more than YAML_MAX_VALUES values (alias bombs) is a
    YAMLOverBudget at the line where the budget ran out.
    """

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.depth = 0
        self.values = 0  # so far, aliases expanded
        self.expanded: dict[str, int] = {}  # anchor -> its size with aliases expanded

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self.expanded:
                raise YAMLOverBudget(None, None, f"alias *{event.anchor} inside its own anchor "
                                     f"&{event.anchor}: a value cannot contain itself",
                                     event.start_mark)
            node = super().compose_node(parent, index)  # an undefined alias fails here
            self._count(self.expanded[event.anchor], event.start_mark,
                        f"alias *{event.anchor} expands the document to")
            return node
        if self.depth == YAML_MAX_DEPTH:
            raise YAMLOverBudget(None, None, f"nested more than {YAML_MAX_DEPTH} levels deep; "
                                 f"an experiment nests a few", event.start_mark)
        before = self.values
        self.depth += 1
        node = super().compose_node(parent, index)
        self.depth -= 1
        self._count(1, event.start_mark, "the document holds")
        if event.anchor is not None:
            self.expanded[event.anchor] = self.values - before
        return node

    def construct_mapping(self, node, deep=False):
        """A mapping, refused when it names a key twice (a `<<` merge may override)."""
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(None, None, f"duplicate key {key!r} (first at line "
                                   f"{seen[key].line + 1}); YAML would keep only the last",
                                   key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def _count(self, values: int, mark, what: str) -> None:
        self.values += values
        if self.values > YAML_MAX_VALUES:
            raise YAMLOverBudget(None, None, f"{what} more than {YAML_MAX_VALUES:,} values "
                                 f"(aliases written out); an experiment needs a few hundred",
                                 mark)


def load_yaml(text: str):
    """safe_load within the budgets of BoundedLoader (YAMLOverBudget past them)."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _where(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"


def read_yaml(path: Path, *, included_by: Path | None = None) -> dict:
    """The file's top-level mapping; a ConfigError if it is missing, broken, empty, a list, or
    over the nesting and alias budgets."""
    what = f"base file (included by {included_by})" if included_by else "experiment file"
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    if not path.is_file():  # a folder, a FIFO, a device: never opened
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ConfigError(f"{path}: {what} is {kind}; name a YAML file")
    if path.stat().st_size > YAML_MAX_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes, over the {YAML_MAX_BYTES:,} "
                          f"an experiment or sweep file may have; is it the right file?")
    try:
        content = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); is it the right "
                          f"file?") from None
    except (YAMLOverBudget, DuplicateKey) as err:
        raise ConfigError(f"{path}: refused at {_where(err)}: {err.problem}") from None
    except yaml.MarkedYAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error at {_where(err)}: {err.problem}") from None
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
    if len(_chain) == BASE_MAX_DEPTH:
        raise ConfigError(f"{_chain[0]}: its `base` chain is longer than {BASE_MAX_DEPTH} files "
                          f"(the {BASE_MAX_DEPTH + 1}th is {path}); an experiment needs one or "
                          f"two")
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
        parsed = load_yaml(value)
    except YAMLOverBudget as err:  # the key alone: the value may be kilobytes long
        raise ConfigError(f"--set {key}=...: refused: {err.problem}") from None
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


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                    saved: bool = False) -> Experiment:
    """Read, merge, override and validate an experiment (`saved`: one an earlier run wrote);
    raises ConfigError on any problem."""
    raw = apply_overrides(load_raw(Path(path)), overrides)
    return validate(raw, source=str(path), saved=saved)


def validate(raw: dict, *, source: str, saved: bool = False) -> Experiment:
    """The experiment `raw` describes; a ConfigError naming `source` and every bad field.
    `saved`: a config an earlier version saved, whose retired keys are dropped."""
    try:
        return Experiment.model_validate(raw, context={SAVED: True} if saved else None)
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
