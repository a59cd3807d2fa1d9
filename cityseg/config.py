"""The experiment file: Pydantic models, loading (base inheritance, --set overrides), errors.

`load_experiment(path, overrides)` reads YAML, merges `base:` files, applies overrides and
validates everything before anything else happens. Every problem becomes one ConfigError that
names the file and the dotted path of each bad field, with a suggestion where one is close.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Importing the component packages fills the registries that the unions below are made of.
from cityseg import data, losses, models, optim  # noqa: F401
from cityseg.data.cityscapes import IGNORE_INDEX
from cityseg.data.tasks import TASKS, Task
from cityseg.data.transforms import device_problem
from cityseg.errors import ConfigError
from cityseg.registry import (
    AUGMENTATIONS,
    DATASETS,
    LOSSES,
    MODELS,
    OPTIMIZERS,
    SCHEDULERS,
    BuildContext,
    Registry,
    suggest,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InferenceConfig(Section):
    """How validation, evaluate, calibrate and predict turn a frame into logits."""

    mode: Literal["whole", "slide"] = Field(
        "whole", description="whole: the frame (at data.scale) in one pass; slide: windows of "
                             "data.image_size over it, overlapping logits averaged")
    overlap: float = Field(1 / 3, ge=0.0, lt=1.0,
                           description="slide: fraction of a window its neighbour overlaps")
    tta: Literal["none", "flip"] = Field(
        "none", description="flip: average the logits of the frame and of its mirror image")

    def describe(self) -> str:
        """E.g. `slide (overlap 0.33) + flip`: what the run's metrics come from."""
        text = f"slide (overlap {self.overlap:.2g})" if self.mode == "slide" else "whole"
        return text + (" + flip" if self.tta == "flip" else "")


class TrainerConfig(Section):
    """How to train."""

    epochs: int = Field(15, ge=1, description="passes over the training set")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="autocast precision; auto: bf16 where the hardware has native bf16 "
                            "(CUDA, recent CPUs), else fp32; fp16 adds a gradient scaler")
    channels_last: bool = Field(
        True, description="NHWC memory layout, faster convolutions on GPUs and CPUs")
    compile: bool = Field(
        False, description="torch.compile the model (slow first epoch, faster later ones)")
    deterministic: bool = Field(
        False, description="deterministic algorithms: identical metrics across runs, maybe slower")
    grad_clip_norm: float = Field(
        0.0, ge=0.0, description="clip the gradient norm to this; 0 disables")
    accumulate: int = Field(
        1, ge=1, description="batches whose gradients are summed per optimizer step")
    threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="foreground where sigmoid(logit) > threshold")
    boundary_tolerance: int = Field(
        2, ge=0, description="pixels a boundary may be off and still count, for val/boundary_f1")
    monitor: str = Field(
        "auto", description="metric that picks the best checkpoint, drives early stopping and "
                            "the plateau scheduler; auto: val/dice for binary, val/miou for "
                            "multiclass")
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="whether the monitored metric should rise or fall; auto: min for "
                            "losses, else max")
    patience: int = Field(
        0, ge=0, description="stop after this many epochs without improvement; 0 disables")
    min_delta: float = Field(
        0.0, ge=0.0, description="smallest change that counts as an improvement")
    checkpoint_minutes: float = Field(
        10.0, ge=0.0, description="also write last.pt mid-epoch, at the next optimizer step once "
                                  "this many minutes have passed, so a crash loses minutes, not "
                                  "an epoch; 0: at epoch ends only")
    sync_bn: bool | Literal["auto"] = Field(
        "auto", description="SyncBatchNorm across processes (torchrun): auto = on CUDA with more "
                            "than one process and model.norm batch; it does not exist on the CPU")
    inference: InferenceConfig = Field(default_factory=InferenceConfig,
                                       description=InferenceConfig.__doc__)


class TrackingConfig(Section):
    """Where and how the run is recorded."""

    experiment: str = Field("cityseg", min_length=1, description="MLflow experiment name")
    dir: Path = Field(
        Path("runs"), description="root of all outputs: mlflow.db, artifacts/, checkpoints/")
    num_samples: int = Field(4, ge=0, description="validation images in the per-epoch sample panel")
    uri: str | None = Field(
        None, description="MLflow tracking URI (a server: http://host:5000); --tracking-uri and "
                          "MLFLOW_TRACKING_URI take precedence; none: sqlite:///<dir>/mlflow.db")
    upload_checkpoints: bool | Literal["auto"] = Field(
        "auto", description="upload last.pt (and a new best.pt) as artifacts at every epoch end, "
                            "so another machine can resume; auto: with a remote store")
    system_metrics: bool = Field(True, description="log CPU, memory, disk and GPU use "
                                                   "(system/...) with MLflow's monitor")
    log_model: bool = Field(
        True, description="log the best model at the end as a servable MLflow pyfunc (uint8 "
                          "images in, masks out), with its validation metrics")
    register_model: str | None = Field(
        None, pattern=r"^[\w.-]+$", description="register the logged model in the MLflow model "
                                               "registry under this name")


DEFAULT_COMPONENTS = {"model": "unet", "loss": "weighted_bce", "optimizer": "adamw",
                      "scheduler": "cosine"}


def _default(registry: Registry, field: str) -> Any:
    name = DEFAULT_COMPONENTS[field]
    return Field(default_factory=lambda: registry.get(name).params(name=name),
                 description=f"{registry.kind}: one of {', '.join(registry.names())}")


class Experiment(Section):
    """One experiment file, fully resolved."""

    name: str = Field(min_length=1, pattern=r"^[\w.-]+$",
                      description="run name (letters, digits, _ . -)")
    description: str | None = Field(
        None, description="what this experiment tries; the MLflow run's description")
    seed: int = Field(42, description="seed of every random number generator")
    data: DATASETS.union() = Field(description=f"dataset: one of {', '.join(DATASETS.names())}")
    augment: list[AUGMENTATIONS.union()] = Field(
        [], description="training augmentations, applied in order to image and mask together")
    model: MODELS.union() = _default(MODELS, "model")
    loss: LOSSES.union() = _default(LOSSES, "loss")
    optimizer: OPTIMIZERS.union() = _default(OPTIMIZERS, "optimizer")
    scheduler: SCHEDULERS.union() = _default(SCHEDULERS, "scheduler")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig,
                                   description=TrainerConfig.__doc__)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description=TrackingConfig.__doc__)

    @model_validator(mode="after")
    def _image_size_fits_model(self) -> Experiment:
        divisor = self.model.input_divisor
        if any(side % divisor for side in self.data.image_size):
            raise ValueError(f"data.image_size {list(self.data.image_size)} must be divisible by "
                             f"2**model.depth = {divisor}")
        frame = self.data.frame_size
        if frame != tuple(self.data.image_size):
            if self.trainer.inference.mode == "whole" and any(s % divisor for s in frame):
                raise ValueError(f"data.scale {list(frame)} must be divisible by 2**model.depth "
                                 f"= {divisor} for trainer.inference.mode whole (or use slide)")
            if not any(a.name in ("random_crop", "random_resized_crop") for a in self.augment):
                raise ValueError(f"data.scale {list(frame)} differs from data.image_size "
                                 f"{list(self.data.image_size)}: training samples must be cut "
                                 f"to image_size; add random_crop (after random_scale) or "
                                 f"random_resized_crop to augment")
        if self.data.augment_on == "device" and (problem := device_problem(self.augment)):
            raise ValueError(f"data.augment_on: device: {problem}")
        return self

    @model_validator(mode="after")
    def _loss_and_monitor_fit_task(self) -> Experiment:
        task = self.data.task
        if task not in self.loss.tasks:
            fitting = [n for n in LOSSES.names() if task in LOSSES.get(n).params.tasks]
            raise ValueError(f"loss.name: {self.loss.name} is a loss for the "
                             f"{' or '.join(self.loss.tasks)} task but data.task is {task}; "
                             f"use one of {', '.join(fitting)}")
        allowed = self.task.monitors
        if self.trainer.monitor not in ("auto", *allowed):
            raise ValueError(f"trainer.monitor: {self.trainer.monitor} is not a per-epoch metric "
                             f"of the {task} task{suggest(self.trainer.monitor, list(allowed))}; "
                             f"use auto, {', '.join(allowed)}")
        return self

    @property
    def monitor(self) -> str:
        """The metric that picks the best checkpoint, with auto resolved for the task."""
        if self.trainer.monitor != "auto":
            return self.trainer.monitor
        return self.task.monitors[0]

    @property
    def monitor_mode(self) -> str:
        """max or min, with auto resolved: losses fall, scores rise."""
        if self.trainer.mode != "auto":
            return self.trainer.mode
        return "min" if self.monitor.endswith("loss") else "max"

    @property
    def task(self) -> Task:
        """The entry of the task table for data.task."""
        return TASKS[self.data.task]

    def build_context(self) -> BuildContext:
        """What component builders may know about this experiment besides their own params."""
        return BuildContext(task=self.data.task, out_channels=self.task.out_channels,
                            ignore_index=IGNORE_INDEX, image_size=self.data.image_size,
                            seed=self.seed, frame_size=self.data.frame_size)


REGISTRY_FIELDS = {"data": DATASETS, "augment": AUGMENTATIONS, "model": MODELS,
                   "loss": LOSSES, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}


# ---------------------------------------------------------------- loading


def read_yaml(path: Path, *, included_by: Path | None = None) -> dict:
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
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        by_path: dict[str, list[str]] = {}  # a union field fails once per branch: one line
        for error in err.errors():
            path, _, message = format_error(error, raw).partition(": ")
            if message not in by_path.setdefault(path, []):
                by_path[path].append(message)
        lines = [f"{path}: {'; or '.join(messages)}" if messages[0] else path
                 for path, messages in by_path.items()]
        count = f"{len(lines)} error{'s' if len(lines) > 1 else ''}"
        raise ConfigError(f"{source}: {count}\n  " + "\n  ".join(lines)) from None


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


# ---------------------------------------------------------------- error messages


def _clean_loc(loc: tuple, raw: Any) -> list[str | int]:
    """Drop the union tags Pydantic inserts into locations ('loss', 'dice', 'smooth')."""
    path, node = [], raw
    for part in loc:
        if node is not None and not isinstance(node, (dict, list)):
            continue  # a union branch label ('float', "literal['auto']") under a plain value
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            node = node[part]
        elif isinstance(node, dict) and node.get("name") == part:
            continue  # a discriminator tag, not a key of the file
        else:
            node = None
        path.append(part)
    return path


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The BaseModel class that validates `node` under `annotation` (unions resolved by name)."""
    if get_origin(annotation) is Annotated:
        return _model_of(get_args(annotation)[0], node)
    if get_origin(annotation) is Union:
        tag = node.get("name") if isinstance(node, dict) else None
        for member in get_args(annotation):
            if _model_of(member, node) and member.model_fields.get("name") and \
                    get_args(member.model_fields["name"].annotation) == (tag,):
                return member
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _keys_at(path: list, raw: Any) -> list[str]:
    """The valid keys of the section at `path`, for 'did you mean' suggestions."""
    annotation, node = Experiment, raw
    for part in path:
        if isinstance(part, int):
            annotation = get_args(annotation)[0]
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


def format_error(error: dict, raw: dict) -> str:
    """One line: the dotted path, what is wrong, what was given and what would be valid."""
    path = _clean_loc(error["loc"], raw)
    dotted = ".".join(str(p) for p in path) or "(top level)"
    kind, field = error["type"], path[0] if path else None
    registry = REGISTRY_FIELDS.get(field) if isinstance(field, str) else None
    if kind == "extra_forbidden":
        valid = _keys_at(path[:-1], raw)
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
