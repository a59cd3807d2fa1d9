"""Pretrained encoders for the U-Net: torchvision's classification backbones, headless.

Each entry names the torchvision model and how its modules split into down-sampling stages.
The backbone is kept whole under `net` (minus its classifier head and any stage the U-Net's
depth does not reach), so its state dict keys are torchvision's own: a state dict saved from a
torchvision model, or torchvision's ImageNet weights, load into it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cityseg.errors import ConfigError

# ImageNet's RGB statistics (of 0..1 values): torchvision's backbones learned on inputs
# normalised by them, and they do not hurt a network trained from scratch (the plain encoder)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    description: str
    stages: tuple[tuple[str, ...], ...]  # module paths of each stage, shallow to deep
    channels: tuple[int, ...]  # each stage's output channels
    first_stride: int  # the first stage's output stride (2, or 4 for ConvNeXt's patchify stem)
    head: tuple[str, ...]  # the classifier: replaced by Identity
    # the input normalisation its weights expect (the preprocessing travels with the encoder)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _features(*groups: range) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"features.{i}" for i in group) for group in groups)


_RESNET_STAGES = (("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",),
                  ("layer4",))

ENCODERS: dict[str, EncoderSpec] = {
    "resnet18": EncoderSpec("ResNet-18 (11.2M encoder parameters)", _RESNET_STAGES,
                            (64, 64, 128, 256, 512), 2, ("fc",)),
    "resnet34": EncoderSpec("ResNet-34 (21.3M), the usual U-Net encoder on Cityscapes",
                            _RESNET_STAGES, (64, 64, 128, 256, 512), 2, ("fc",)),
    "resnet50": EncoderSpec("ResNet-50 (23.5M), bottleneck blocks", _RESNET_STAGES,
                            (64, 256, 512, 1024, 2048), 2, ("fc",)),
    "convnext_tiny": EncoderSpec(
        "ConvNeXt-T (27.8M); its first stage has stride 4, so depth is 2 to 5",
        _features(range(0, 2), range(2, 4), range(4, 6), range(6, 8)), (96, 192, 384, 768), 4,
        ("classifier",)),
    "mobilenet_v3_large": EncoderSpec(
        "MobileNetV3-Large (3.0M): fast, for mobile and CPU",
        _features(range(0, 2), range(2, 4), range(4, 7), range(7, 13), range(13, 17)),
        (16, 24, 40, 112, 960), 2, ("classifier",)),
    "mobilenet_v2": EncoderSpec(
        "MobileNetV2 (2.2M): small and fast on a CPU; real ImageNet features can be had offline",
        _features(range(0, 2), range(2, 4), range(4, 7), range(7, 14), range(14, 19)),
        (16, 24, 32, 96, 1280), 2, ("classifier",)),
    "efficientnet_b0": EncoderSpec(
        "EfficientNet-B0 (4.0M)",
        _features(range(0, 2), range(2, 3), range(3, 4), range(4, 6), range(6, 9)),
        (16, 24, 40, 112, 1280), 2, ("classifier",)),
}


def normalisation(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of RGB values in 0..1 that an encoder's inputs are normalised by; `plain`
    (the original U-Net encoder) takes ImageNet's."""
    spec = ENCODERS.get(encoder)
    return (spec.mean, spec.std) if spec is not None else (IMAGENET_MEAN, IMAGENET_STD)


def stages_for(name: str, depth: int) -> int:
    """How many of the encoder's stages a U-Net of this depth uses; ConfigError if it cannot."""
    spec = ENCODERS[name]
    first = spec.first_stride.bit_length() - 1  # log2
    deepest = first + len(spec.stages) - 1
    if not first <= depth <= deepest:
        strides = ", ".join(str(spec.first_stride * 2**i) for i in range(len(spec.stages)))
        raise ConfigError(f"model.depth: {name} has down-sampling stages at strides {strides}; "
                          f"depth must be {first} to {deepest} with it (got {depth})")
    return depth - first + 1


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class TorchvisionEncoder(nn.Module):
    """A torchvision backbone as a U-Net encoder: returns each used stage's feature map."""

    def __init__(self, name: str, depth: int, weights: str) -> None:
        super().__init__()
        import torchvision

        spec = ENCODERS[name]
        used = stages_for(name, depth)
        net = getattr(torchvision.models, name)(weights=None)
        state = load_weights(name, weights) if weights != "none" else None
        for path in spec.head:
            _replace(net, path, nn.Identity())
        for stage in spec.stages[used:]:  # deeper than the U-Net goes: not built
            for path in stage:
                _replace(net, path, nn.Identity())
        if state is not None:
            _load_into(net, state, name, weights)
        self.net = net
        self.channels = list(spec.channels[:used])
        self.strides = [spec.first_stride * 2**i for i in range(used)]
        # a plain list: the modules are registered once, under net, with torchvision's names
        self._stages = [[net.get_submodule(path) for path in stage] for stage in spec.stages[:used]]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self._stages:
            for module in stage:
                x = module(x)
            features.append(x)
        return features


def hub_file(name: str) -> tuple[str, Path]:
    """torchvision's default ImageNet weights of `name`: their URL, and the file torch's hub
    cache keeps them in."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def load_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict `model.weights` names: torchvision's ImageNet weights (from the torch hub
    cache, downloaded there if missing) or a file."""
    if weights == "imagenet":
        url, path = hub_file(name)
        if not path.is_file():
            try:
                return torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu",
                                                          weights_only=True)
            except Exception as err:  # noqa: BLE001  (URLError, timeouts, a bad hash)
                raise ConfigError(
                    f"model.weights: imagenet: torchvision's {name} weights could not be "
                    f"downloaded from {url} ({err}).\n  Put that file at {path} (download it "
                    f"on a machine with internet), or set model.weights: PATH to a state dict "
                    f"saved from torchvision's {name}") from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"model.weights: {weights}: no such file; give a state dict saved "
                              f"from torchvision's {name} (torch.save(model.state_dict(), PATH)), "
                              f"imagenet, or none")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (truncated, not a torch file)
        raise ConfigError(f"model.weights: {path} is not a readable state dict ({err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights: {path} holds a {type(state).__name__}, not a state "
                          f"dict")
    return state


def _load_into(net: nn.Module, state: dict, name: str, weights: str) -> None:
    """Every encoder tensor must come from the file; the head and unused stages may be there."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ConfigError(f"model.weights: {weights} does not fit torchvision's {name}: "
                          f"{len(missing)} encoder tensors are missing (first: {missing[0]})")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ConfigError(f"model.weights: {weights} does not fit torchvision's {name}: "
                          f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the encoder's "
                          f"is {tuple(own[wrong[0]].shape)}")
    net.load_state_dict({k: state[k] for k in own})
