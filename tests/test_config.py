from pathlib import Path

import pytest
import yaml

from cityseg.config import (
    Experiment,
    apply_overrides,
    flatten,
    load_experiment,
    parse_override,
    read_yaml,
    to_yaml,
    validate,
)
from cityseg.config.loading import YAML_MAX_DEPTH, YAML_MAX_VALUES
from cityseg.errors import ConfigError
from cityseg.registry import LOSSES
from cityseg.train.resume import check_same_experiment
from tests.conftest import EXPERIMENTS, QUICKSTART

MINIMAL = {"name": "t", "data": {"name": "synthetic", "image_size": [32, 64]}}


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_(**sections) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    raw.update(sections)
    return raw


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_validates_and_round_trips(path, tmp_path):
    exp = load_experiment(path)
    again = load_experiment(write(tmp_path, to_yaml(exp)))
    assert again == exp


def test_defaults_fill_omitted_sections():
    exp = validate(MINIMAL, source="x")
    assert exp.model.name == "unet" and exp.loss.name == "weighted_bce" and exp.trainer.epochs == 15


def test_misspelled_key_names_the_path_and_suggests():
    with pytest.raises(ConfigError,
                       match=r"model\.base_chanels: unknown key \(did you mean base_channels\?\)"):
        validate(with_(model={"name": "unet", "base_chanels": 8}), source="x")


def test_misspelled_top_level_section():
    with pytest.raises(ConfigError, match=r"trainr: unknown key \(did you mean trainer\?\)"):
        validate(with_(trainr={"epochs": 1}), source="x")


def test_wrong_type_names_the_field_and_value():
    with pytest.raises(ConfigError, match=r"trainer\.epochs: .*integer.*'three'"):
        validate(with_(trainer={"epochs": "three"}), source="x")


@pytest.mark.parametrize("section,bad,expected", [
    ("trainer", {"epochs": -1}, r"trainer\.epochs: .*greater than or equal to 1"),
    ("optimizer", {"name": "adamw", "lr": 0}, r"optimizer\.lr: .*greater than 0"),
    ("augment", [{"name": "hflip", "p": 1.5}], r"augment\.0\.p: .*less than or equal to 1"),
])
def test_out_of_range_values(section, bad, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(with_(**{section: bad}), source="x")


def test_image_size_must_divide_by_two_to_the_depth():
    raw = with_(model={"name": "unet", "depth": 4})
    raw["data"]["image_size"] = [40, 64]
    with pytest.raises(ConfigError, match=r"data\.image_size \[40, 64\] must be divisible by "
                                          r"2\*\*model\.depth = 16"):
        validate(raw, source="x")


def test_unknown_component_lists_valid_names_and_closest():
    valid = ", ".join(LOSSES.names())
    with pytest.raises(ConfigError,
                       match=rf"loss\.name: unknown loss 'dise' \(did you mean dice\?\); "
                             rf"valid names: {valid}$"):
        validate(with_(loss={"name": "dise"}), source="x")


def test_loss_must_fit_the_task():
    raw = with_(loss={"name": "weighted_bce"})
    raw["data"]["task"] = "multiclass"
    with pytest.raises(ConfigError,
                       match=r"loss\.name: weighted_bce is a loss for the binary task but "
                             r"data\.task is multiclass; use one of cross_entropy"):
        validate(raw, source="x")
    raw["loss"] = {"name": "cross_entropy"}
    raw["trainer"] = {"monitor": "val/dice"}
    with pytest.raises(ConfigError, match=r"trainer\.monitor: val/dice is not a per-epoch metric "
                                          r"of the multiclass task"):
        validate(raw, source="x")
    raw["trainer"] = {}
    assert validate(raw, source="x").monitor == "val/miou"


def test_unknown_key_inside_a_component_uses_that_components_keys():
    with pytest.raises(ConfigError, match=r"loss\.smoth: unknown key \(did you mean smooth\?\)"):
        validate(with_(loss={"name": "dice", "smoth": 1.0}), source="x")


def test_several_errors_are_reported_together(tmp_path):
    path = write(tmp_path, "name: t\ndata: {name: synthetic}\ntrainer: {epochs: 0, devise: cpu}\n")
    with pytest.raises(ConfigError, match=r"2 errors") as info:
        load_experiment(path)
    assert "trainer.epochs" in str(info.value) and "trainer.devise" in str(info.value)
    assert str(path) in str(info.value)


def test_yaml_syntax_error_reports_line_and_column(tmp_path):
    path = write(tmp_path, "name: t\ndata: {name: synthetic\ntrainer: 1\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: YAML syntax error at line \d+, column \d+"):
        load_experiment(path)


def nested(levels: int) -> str:
    """A mapping whose innermost value lies `levels` deep (the top-level mapping is level 1)."""
    inner = levels - 2  # the top mapping and the leaf scalar are levels too
    return "a: " + "{a: " * inner + "1" + "}" * inner + "\n"


def alias_bomb(levels: int = 9) -> str:
    """Billion laughs: each line lists nine aliases of the one above (9**levels values)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_nesting_up_to_the_budget_loads_and_deeper_is_refused_with_the_line(tmp_path):
    assert read_yaml(write(tmp_path, nested(YAML_MAX_DEPTH)))["a"]
    with pytest.raises(ConfigError, match=rf"exp\.yaml: refused at line 1, column \d+: nested "
                                          rf"more than {YAML_MAX_DEPTH} levels deep"):
        read_yaml(write(tmp_path, nested(YAML_MAX_DEPTH + 1)))
    with pytest.raises(ConfigError, match=r"exp\.yaml: refused at line 1, .*nested more than"):
        load_experiment(write(tmp_path, nested(10_000)))  # a RecursionError before
    block = "".join("  " * i + f"k{i}:\n" for i in range(200))  # the same in block style
    with pytest.raises(ConfigError, match=rf"refused at line {YAML_MAX_DEPTH}, column \d+"):
        read_yaml(write(tmp_path, block))


def test_an_alias_bomb_is_refused_at_the_alias_that_exceeds_the_budget(tmp_path):
    path = write(tmp_path, alias_bomb())
    with pytest.raises(ConfigError, match=rf"exp\.yaml: refused at line 6, column \d+: alias "
                                          rf"\*l4 expands the document to more than "
                                          rf"{YAML_MAX_VALUES:,} values"):
        load_experiment(path)


def test_a_value_containing_itself_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2, column \d+: alias \*d inside its own anchor"):
        read_yaml(write(tmp_path, "name: t\ndata: &d {name: synthetic, again: [*d]}\n"))


def test_anchors_aliases_and_merge_keys_within_the_budget_load_as_safe_load_reads_them(tmp_path):
    text = ("base_data: &data {name: synthetic, image_size: [32, 64]}\n"
            "train: {<<: *data, batch_size: 2}\nval: *data\n"
            "many: [" + ", ".join(["*data"] * 1000) + "]\n")
    assert read_yaml(write(tmp_path, text)) == yaml.safe_load(text)
    with pytest.raises(ConfigError, match=r"YAML syntax error .*undefined alias"):
        read_yaml(write(tmp_path, "a: *nowhere\n"))


@pytest.mark.parametrize("path", [*EXPERIMENTS, *sorted((QUICKSTART.parent / "sweeps")
                                                        .glob("*.yaml"))], ids=lambda p: p.name)
def test_every_experiment_and_sweep_file_reads_as_safe_load_reads_it(path):
    assert read_yaml(path) == yaml.safe_load(path.read_text())


def test_an_override_value_is_held_to_the_same_budgets():
    bomb = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 20_000) + "]"
    with pytest.raises(ConfigError, match=r"^--set data\.foreground=\.\.\.: refused: alias \*a "
                                          r"expands the document to more than 100,000 values"):
        parse_override(f"data.foreground={bomb}")
    with pytest.raises(ConfigError, match=r"^--set a=\.\.\.: refused: nested more than"):
        parse_override("a=" + "[" * 1000 + "]" * 1000)


def test_a_huge_or_binary_file_is_refused_before_it_is_parsed(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml: 2,000,000 bytes, over the 1,048,576 an "
                                          r"experiment or sweep file may have"):
        read_yaml(write(tmp_path, "#" * 2_000_000))
    (tmp_path / "model.yaml").write_bytes(b"name: t\n\x89PNG\xff\xfe")
    with pytest.raises(ConfigError, match=r"model\.yaml: not UTF-8 text \(byte 8\)"):
        load_experiment(tmp_path / "model.yaml")


@pytest.mark.parametrize("text,expected", [
    ("", "file is empty"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_empty_file_and_non_mapping(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_experiment(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")


def test_base_inheritance_deep_merges_and_lists_replace(tmp_path):
    write(tmp_path, "name: parent\nseed: 1\n"
                    "data: {name: synthetic, image_size: [32, 64], batch_size: 4}\n"
                    "augment: [{name: hflip}, {name: rotate}]\n", "parent.yaml")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, "base: ../parent.yaml\nname: child\ndata: {batch_size: 2}\n"
                            "augment: [{name: color_jitter}]\n", "sub/child.yaml")
    exp = load_experiment(child)
    assert ((exp.name, exp.seed, exp.data.batch_size, exp.data.image_size)
            == ("child", 1, 2, (32, 64)))
    assert [a.name for a in exp.augment] == ["color_jitter"]


def test_base_cycle_names_the_chain(tmp_path):
    write(tmp_path, "base: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "base: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_experiment(tmp_path / "a.yaml")


def test_missing_base_file(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"gone\.yaml: base file \(included by .*exp\.yaml\) not found"):
        load_experiment(write(tmp_path, "base: gone.yaml\nname: t\n"))


def test_overrides_parse_yaml_values():
    exp = load_experiment(QUICKSTART, ["trainer.epochs=3", "data.image_size=[64,128]",
                                       "loss.pos_weight=8", "augment.0.p=1.0"])
    assert exp.trainer.epochs == 3 and exp.data.image_size == (64, 128)
    assert exp.loss.pos_weight == 8.0 and exp.augment[0].p == 1.0


def test_override_of_unknown_key_is_an_error():
    with pytest.raises(ConfigError,
                       match=r"trainer\.epochz: unknown key \(did you mean epochs\?\)"):
        load_experiment(QUICKSTART, ["trainer.epochz=3"])


@pytest.mark.parametrize("override,expected", [
    ("trainer.epochs", "expected KEY=VALUE"),
    ("name.x=1", "name is a value, not a section"),
    ("augment.9.p=1", "is not an index"),
])
def test_malformed_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        apply_overrides({"name": "t", "augment": [{"name": "hflip"}]}, [override])


def test_flatten_gives_dotted_params():
    flat = flatten(load_experiment(QUICKSTART).model_dump(mode="json"))
    assert flat["model.depth"] == "3"
    assert flat["data.image_size"] == "[96, 192]"
    assert flat["augment.0.name"] == "hflip"


def test_every_field_has_a_description():
    schema = Experiment.model_json_schema()
    defs = schema["$defs"]

    def described(prop: dict) -> bool:  # a $ref inherits the description of the class it names
        ref = prop.get("$ref", "").removeprefix("#/$defs/")
        return bool(prop.get("description") or (ref and defs[ref].get("description")))

    missing = [f"{model}.{field}" for model, spec in defs.items()
               for field, prop in spec.get("properties", {}).items() if not described(prop)]
    missing += [f for f, prop in schema["properties"].items() if not described(prop)]
    assert not missing


def test_switching_a_component_keeps_only_keys_the_new_one_accepts():
    exp = load_experiment(QUICKSTART, ["loss.name=dice"])  # quickstart's loss has pos_weight
    assert exp.loss.name == "dice" and exp.loss.smooth == 1.0
    exp = load_experiment(QUICKSTART, ["loss.name=bce_dice", "loss.dice_weight=0.5"])
    assert exp.loss.pos_weight == 2.0 and exp.loss.dice_weight == 0.5  # shared key kept
    exp = load_experiment(QUICKSTART, ["augment.1.name=hflip"])
    assert exp.augment[1].name == "hflip"


def test_switching_to_an_unknown_component_is_still_an_error():
    with pytest.raises(ConfigError,
                       match=r"loss\.name: unknown loss 'dicee' \(did you mean dice\?\)"):
        load_experiment(QUICKSTART, ["loss.name=dicee"])


def test_committed_json_schema_is_current():
    import json

    from tests.conftest import REPO

    committed = json.loads((REPO / "experiment.schema.json").read_text())
    assert committed == Experiment.model_json_schema(), "stale: run `make schema` and commit it"


def test_a_file_switching_component_over_its_base_drops_the_old_params(tmp_path):
    write(tmp_path, "name: p\ndata: {name: synthetic, image_size: [32, 64]}\n"
                    "loss: {name: bce_dice, pos_weight: 3, smooth: 0.5}\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nloss: {name: dice}\n", "child.yaml")
    exp = load_experiment(child)
    assert exp.loss.name == "dice" and exp.loss.smooth == 0.5  # smooth kept, pos_weight dropped


def test_override_of_a_component_section_the_file_omits(tmp_path):
    path = write(tmp_path, "name: t\ndata: {name: synthetic, image_size: [32, 64]}\n")
    exp = load_experiment(path, ["optimizer.lr=1e-4", "loss.pos_weight=3"])
    assert exp.optimizer.name == "adamw" and exp.optimizer.lr == 1e-4
    assert exp.loss.name == "weighted_bce" and exp.loss.pos_weight == 3.0


def test_class_weights_that_do_not_fit_the_task_are_refused_with_the_experiment():
    multiclass = QUICKSTART.with_name("multiclass.yaml")
    with pytest.raises(ConfigError, match=r"multiclass.yaml: 1 error\n  loss.class_weights: 3 "
                                          r"numbers given, but the multiclass task has 19"):
        load_experiment(multiclass, ["loss.class_weights=[1, 2, 3]"])
    assert load_experiment(multiclass, [f"loss.class_weights={[1.0] * 19}"]).loss.class_weights


def test_a_kept_scale_without_a_crop_is_refused():
    with pytest.raises(Exception, match=r"data\.scale \[64, 128\] differs .* add random_crop"):
        load_experiment(QUICKSTART, ["data.scale=[64,128]", "data.image_size=[32,64]",
                                     "augment=[{name: hflip}]"])


# ------------------------------------------------------------------ the boundary tolerance's unit


def saved_before_the_bf_score(exp: Experiment, value=2) -> dict:
    """The config a checkpoint of an older cityseg holds: a pixel tolerance, no new key."""
    config = exp.model_dump(mode="json")
    del config["trainer"]["boundary_tolerance_diagonal"]
    config["trainer"]["boundary_tolerance"] = value
    return config


def test_configs_saved_with_a_pixel_tolerance_still_load(tiny_experiment, tmp_path):
    old = saved_before_the_bf_score(tiny_experiment)
    # as evaluate and predict read a checkpoint
    loaded = validate(old, source="config of checkpoint old.pt", saved=True)
    assert loaded == tiny_experiment and loaded.trainer.boundary_tolerance_diagonal == 0.0075
    check_same_experiment({"config": old}, tiny_experiment, tmp_path / "old.pt")  # --resume
    assert validate(saved_before_the_bf_score(tiny_experiment, 5), source="x",
                    saved=True) == tiny_experiment


def test_an_experiment_file_that_sets_the_retired_pixel_tolerance_is_told_what_replaced_it(
        tiny_experiment):
    with pytest.raises(ConfigError, match=r"trainer: .*boundary_tolerance \(pixels, for the "
                                          r"retired val/boundary_f1\) is gone: set "
                                          r"boundary_tolerance_diagonal"):
        validate(saved_before_the_bf_score(tiny_experiment, 2), source="exp.yaml")
    with pytest.raises(ConfigError, match=r"trainer\.boundary_tolerance_diagonal: Input should "
                                          r"be less than 1"):
        load_experiment(QUICKSTART, ["trainer.boundary_tolerance_diagonal=2"])
