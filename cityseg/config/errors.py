"""Validation errors as one ConfigError: the file, then one line per bad field.

Each line names the dotted path as the user wrote it (Pydantic's union tags dropped), what is
wrong, what was given and what would be valid, with a did-you-mean for close names. The
experiment file and the sweep file share this format: `validation_error(..., schema=...)`.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from cityseg.config.models import REGISTRY_FIELDS, Experiment
from cityseg.errors import ConfigError
from cityseg.registry import suggest

MAX_LINES = 20  # of a validation error's fields: one screen with the title and the advice


def validation_error(err: ValidationError, raw: dict, *, source: str,
                     schema: type[BaseModel] = Experiment) -> ConfigError:
    """`source: N errors` and one line per field; a union that fails per branch gives one line."""
    by_path: dict[str, list[str]] = {}
    for error in err.errors():
        path, _, message = format_error(error, raw, schema=schema).partition(": ")
        if message not in by_path.setdefault(path, []):
            by_path[path].append(message)
    lines = [f"{path}: {'; or '.join(messages)}" if messages[0] else path
             for path, messages in by_path.items()]
    count = f"{len(lines)} error{'s' if len(lines) > 1 else ''}"
    if len(lines) > MAX_LINES:  # one screen: the first ones, and how many more
        lines = [*lines[:MAX_LINES - 1], f"and {len(lines) - MAX_LINES + 1:,} more"]
    return ConfigError(f"{source}: {count}\n  " + "\n  ".join(lines))


def _clean_loc(loc: tuple, raw: Any, *, missing: bool = False) -> list[str | int]:
    """Drop the union tags Pydantic inserts into locations ('loss', 'dice', 'smooth').

    Only a missing field's last part is a key the file lacks; any other key the file lacks is
    a union branch label ('Prune', "literal['median','none']").
    """
    path, node = [], raw
    for index, part in enumerate(loc):
        if node is not None and not isinstance(node, (dict, list)):
            continue  # a union branch label ('float', "literal['auto']") under a plain value
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            node = node[part]
        elif isinstance(node, dict) and node.get("name") == part:
            continue  # a discriminator tag, not a key of the file
        elif isinstance(node, dict) and isinstance(part, str) and \
                not (missing and index == len(loc) - 1):
            continue
        else:
            node = None
        path.append(part)
    return path


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The BaseModel class that validates `node` under `annotation` (unions resolved by name)."""
    if get_origin(annotation) is Annotated:
        return _model_of(get_args(annotation)[0], node)
    if get_origin(annotation) in (Union, types.UnionType):
        members = [m for m in get_args(annotation) if _model_of(m, node)]
        if len(members) == 1:  # `Search | None`: the one section it can be
            return members[0]
        tag = node.get("name") if isinstance(node, dict) else None
        for member in members:
            if member.model_fields.get("name") and \
                    get_args(member.model_fields["name"].annotation) == (tag,):
                return member
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _keys_at(path: list, raw: Any, schema: type[BaseModel]) -> list[str]:
    """The valid keys of the section at `path`, for 'did you mean' suggestions."""
    annotation, node = schema, raw
    for part in path:
        if isinstance(part, int):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:  # a mapping of the user's keys to sections
            annotation = get_args(annotation)[1]
        else:
            cls = _model_of(annotation, node)
            if cls is None or part not in cls.model_fields:
                return []
            annotation = cls.model_fields[part].annotation
        node = node[part] if isinstance(node, (dict, list)) else None
    cls = _model_of(annotation, node)
    return list(cls.model_fields) if cls else []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_error(error: dict, raw: dict, *, schema: type[BaseModel] = Experiment) -> str:
    """One line: the dotted path, what is wrong, what was given and what would be valid."""
    path = _clean_loc(error["loc"], raw, missing=error["type"] == "missing")
    dotted = ".".join(str(p) for p in path) or "(top level)"
    kind, field = error["type"], path[0] if path else None
    # component sections (loss: {name: ...}) are the experiment's; other schemas have none
    registries = REGISTRY_FIELDS if schema is Experiment else {}
    registry = registries.get(field) if isinstance(field, str) else None
    if kind == "extra_forbidden":
        valid = _keys_at(path[:-1], raw, schema)
        return (f"{dotted}: unknown key{suggest(str(path[-1]), valid)}; "
                f"valid keys here: {', '.join(valid)}")
    if registry and (kind == "union_tag_invalid"
                     or (kind == "literal_error" and path[-1] == "name")):
        tag = error["ctx"]["tag"] if kind == "union_tag_invalid" else error["input"]
        where = dotted if path[-1] == "name" else f"{dotted}.name"
        return (f"{where}: unknown {registry.kind} {tag!r}{suggest(str(tag), registry.names())}; "
                f"valid names: {', '.join(registry.names())}")
    if registry and (kind == "union_tag_not_found" or (kind == "missing" and path[-1] == "name")):
        where = dotted if path[-1] == "name" else f"{dotted}.name"
        return f"{where}: missing; choose one of {', '.join(registry.names())}"
    if kind == "missing":
        return f"{dotted}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not path:
        return message
    return f"{dotted}: {message} (got {_short(error['input'])})"
