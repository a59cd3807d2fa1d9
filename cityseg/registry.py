"""One small Registry class: a name -> (builder, params model) table per component kind.

Each entry carries its own Pydantic params model; `Registry.union()` tags those models by
`name` and returns the discriminated union that the experiment config uses for that field.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from cityseg.errors import ConfigError


class Params(BaseModel):
    """Base of every params model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_fits(self, ctx: BuildContext) -> None:
        """Raise ValueError when these params cannot serve the experiment `ctx` describes
        (checked with the experiment, before anything is built)."""


@dataclass(frozen=True)
class BuildContext:
    """What a builder may know about the experiment besides its own params."""

    task: str  # binary | multiclass
    out_channels: int  # 1 logit for binary, C logits for multiclass
    ignore_index: int
    image_size: tuple[int, int]  # (H, W) after resizing
    seed: int = 0  # the experiment's seed, for builders with randomness of their own
    frame_size: tuple[int, int] | None = None  # (H, W) frames are kept at (data.scale)


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    params: type[Params]  # tagged copy of the user's model, with `name: Literal[name]`
    description: str


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean X?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class Registry:
    """Named builders of one component kind (models, losses, augmentations, datasets...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, params: type[Params]) -> Callable:
        """Decorator: `@LOSSES.register("dice", params=DiceParams)` on a `builder(p, ctx)`."""

        def decorator(builder: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"duplicate {self.kind} name {name!r}: already registered by "
                                 f"{self._entries[name].builder.__module__}")
            if "name" in params.model_fields:
                raise ValueError(f"{params.__name__} must not declare `name`; the registry adds it")
            description = (builder.__doc__ or params.__doc__ or "").strip().splitlines()[0:1]
            tagged = create_model(
                params.__name__,
                __base__=params,
                __module__=params.__module__,
                name=(Literal[name], Field(description=f"{self.kind} to use")),
            )
            self._entries[name] = Entry(name, builder, tagged, "".join(description))
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{suggest(name, self.names())}; "
                              f"valid names: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, params: Params, *args: Any, **kwargs: Any) -> Any:
        """Call the builder registered under `params.name` with the params and extra args."""
        return self.get(params.name).builder(params, *args, **kwargs)

    def union(self) -> Any:
        """The discriminated union of every entry's params model, tagged by `name`."""
        models = tuple(self._entries[n].params for n in self.names())
        if not models:
            raise RuntimeError(f"registry {self.kind!r} is empty: its package was not imported")
        if len(models) == 1:
            return models[0]
        return Annotated[Union[models], Field(discriminator="name")]  # noqa: UP007

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


MODELS = Registry("model")
LOSSES = Registry("loss")
AUGMENTATIONS = Registry("augmentation")
DATASETS = Registry("dataset")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
