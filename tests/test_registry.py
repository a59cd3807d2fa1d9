import pytest

from cityseg.errors import ConfigError
from cityseg.registry import AUGMENTATIONS, DATASETS, LOSSES, MODELS, Params, Registry


class NoParams(Params):
    """Nothing to set."""


def test_duplicate_name_raises_at_registration():
    registry = Registry("widget")
    registry.register("a", params=NoParams)(lambda p, ctx: None)
    with pytest.raises(ValueError, match="duplicate widget name 'a'"):
        registry.register("a", params=NoParams)(lambda p, ctx: None)


def test_unknown_name_lists_valid_names_and_closest():
    registry = Registry("widget")
    for name in ("alpha", "beta"):
        registry.register(name, params=NoParams)(lambda p, ctx: None)
    with pytest.raises(ConfigError, match=r"unknown widget 'alpah' \(did you mean alpha\?\); "
                                          r"valid names: alpha, beta"):
        registry.get("alpah")


def test_registry_adds_the_name_tag_to_params():
    registry = Registry("widget")
    registry.register("only", params=NoParams)(lambda p, ctx: p)
    params = registry.get("only").params(name="only")
    assert registry.build(params, None) is params
    with pytest.raises(ValueError):
        registry.get("only").params(name="other")


def test_params_may_not_declare_name():
    class Named(Params):
        name: str = "x"

    with pytest.raises(ValueError, match="must not declare `name`"):
        Registry("widget").register("x", params=Named)(lambda p, ctx: None)


def test_component_registries_are_complete_after_import():
    import cityseg.config  # noqa: F401  (imports every component package)

    assert {"unet"} <= set(MODELS.names())
    assert {"weighted_bce", "dice", "bce_dice"} <= set(LOSSES.names())
    assert {"hflip", "rotate", "color_jitter", "random_resized_crop"} <= set(AUGMENTATIONS.names())
    assert {"cityscapes", "synthetic"} <= set(DATASETS.names())
