"""Pretrained-style encoders: torchvision backbones under the U-Net decoder."""

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from mlflow import MlflowClient

from cityseg import checkpoints
from cityseg.cli import main
from cityseg.config import load_experiment
from cityseg.models.encoders import ENCODERS
from cityseg.optim import param_groups
from cityseg.registry import MODELS
from cityseg.tracking import tracking_uri
from cityseg.train.runner import run
from tests.conftest import MOBILENET_V2_WEIGHTS as WEIGHTS
from tests.conftest import QUICKSTART, tiny_overrides


def build(*overrides):
    exp = load_experiment(QUICKSTART, ["data.image_size=[64,64]", "model.base_channels=4",
                                       *overrides])
    return exp, MODELS.build(exp.model, exp.build_context())


def count(module):
    return sum(t.numel() for t in module.parameters())


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_encoder_builds_trains_a_step_and_is_torchvision_minus_its_head(name):
    torch.manual_seed(0)
    exp, model = build(f"model.encoder={name}", "model.depth=5")
    reference = getattr(torchvision.models, name)(weights=None)
    head = sum(count(reference.get_submodule(path)) for path in ENCODERS[name].head)
    assert count(model.encoder) == count(reference) - head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 1, 64, 64)
    before = [t.detach().clone() for t in model.encoder.parameters()]
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.encoder.parameters(),
                                                     strict=True))


def test_a_shallower_unet_builds_only_the_stages_it_uses():
    full = count(build("model.encoder=resnet34", "model.depth=5")[1].encoder)
    shallow = count(build("model.encoder=resnet34", "model.depth=4")[1].encoder)
    layer4 = count(torchvision.models.resnet34(weights=None).layer4)
    assert full - shallow == layer4


def test_weights_from_a_torchvision_state_dict_load_exactly(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(reference.state_dict(), path)  # head included: it is ignored
    _, model = build("model.encoder=resnet18", "model.depth=4", f"model.weights={path}")
    loaded = model.encoder.net.state_dict()
    expected = reference.state_dict()
    assert loaded and all(torch.equal(loaded[k], expected[k]) for k in loaded)
    assert not any(k.startswith(("fc.", "layer4.")) for k in loaded)  # head, unused stage
    broken = {k: v for k, v in expected.items() if not k.startswith("layer2.")}
    torch.save(broken, path)
    with pytest.raises(Exception, match=r"model\.weights: .* encoder tensors are missing"):
        build("model.encoder=resnet18", f"model.weights={path}")


def test_imagenet_weights_offline_fail_before_training_naming_the_file(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    overrides = [*tiny_overrides(tmp_path), "model.encoder=resnet18", "model.weights=imagenet",
                 "data.image_size=[64,64]"]
    assert main(["run", str(QUICKSTART), *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err
    wanted = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(wanted) in err and "model.weights: PATH" in err and "Traceback" not in err
    if (tmp_path / "runs" / "mlflow.db").exists():  # no run was started
        client = MlflowClient(tracking_uri=tracking_uri(tmp_path / "runs"))
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    # the file in place: it is used, offline
    wanted.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wanted)
    build("model.encoder=resnet18", "model.weights=imagenet")


def test_param_groups_split_encoder_and_decoder_and_spare_norms_and_biases():
    _, model = build("model.encoder=resnet18", "model.depth=5")
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.05,
                                                  encoder_lr_mult=0.1, decay_norm_and_bias=False)}
    assert set(groups) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4) and groups["decoder"]["lr"] == 1e-3
    # in this network every 1-D tensor is a norm weight or a bias, and nothing else is
    undecayed = {id(t) for name in ("encoder_no_decay", "decoder_no_decay")
                 for t in groups[name]["params"]}
    assert undecayed == {id(t) for t in model.parameters() if t.ndim == 1}
    assert all(groups[n]["weight_decay"] == 0 for n in ("encoder_no_decay", "decoder_no_decay"))
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_frozen_encoder_keeps_its_weights_and_batchnorm_statistics(tmp_path):
    def encoder_bns(freeze):
        exp = load_experiment(QUICKSTART, [
            *tiny_overrides(tmp_path / str(freeze), epochs=1), "tracking.log_model=false",
            "model.encoder=resnet18", "model.depth=5", f"model.freeze_encoder_epochs={freeze}",
            "optimizer.encoder_lr_mult=0.5"])
        result = run(exp)
        weights = checkpoints.load(result.checkpoints["last"])["model"]
        client = MlflowClient(tracking_uri=tracking_uri(exp.tracking.dir))
        groups = client.download_artifacts(result.run_id, "optimizer_groups.json",
                                           str(tmp_path / str(freeze)))
        assert {"encoder", "decoder"} <= set(json.loads(Path(groups).read_text()))
        return {k: v for k, v in weights.items() if k.startswith("encoder.net.bn1.")}

    frozen = encoder_bns(1)
    assert torch.equal(frozen["encoder.net.bn1.weight"], torch.ones(64))
    assert torch.equal(frozen["encoder.net.bn1.running_mean"], torch.zeros(64))
    assert frozen["encoder.net.bn1.num_batches_tracked"] == 0
    trained = encoder_bns(0)
    assert not torch.equal(trained["encoder.net.bn1.weight"], torch.ones(64))
    assert trained["encoder.net.bn1.num_batches_tracked"] > 0


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_encoder_at_every_depth_it_allows_gives_the_stated_channels_and_widths(name):
    """Each stage's channels and stride as ENCODERS states them, and the decoder's width at
    stride s base_channels * s / 2 (docs/experiments.md), at every depth the encoder allows."""
    spec = ENCODERS[name]
    first = spec.first_stride.bit_length() - 1
    for depth in range(first, first + len(spec.stages)):
        _, model = build(f"model.encoder={name}", f"model.depth={depth}",
                         "model.base_channels=8")
        model.eval()
        with torch.no_grad():
            features = model.encoder(torch.zeros(1, 3, 64, 64))
        used = depth - first + 1
        assert [f.shape[1] for f in features] == list(spec.channels[:used]), depth
        assert [64 // f.shape[-1] for f in features] == [spec.first_stride * 2**i
                                                         for i in range(used)], depth
        # the decoder, deepest first: each Up's output at its stride, down to full resolution
        strides = [spec.first_stride * 2**i for i in range(used - 1)][::-1]
        strides += [spec.first_stride // 2**i for i in range(1, first + 1)]
        assert [up.conv.block[0].out_channels for up in model.ups] == [
            max(1, 8 * s // 2) for s in strides], depth


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} is not here (../shared/data)")
def test_the_shared_imagenet_mobilenet_v2_features_load_with_every_tensor_matched():
    _, model = build("model.encoder=mobilenet_v2", "model.depth=5", f"model.weights={WEIGHTS}")
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    own = model.encoder.net.state_dict()
    assert own.keys() <= state.keys()
    for key, tensor in own.items():
        assert torch.equal(tensor, state[key]), key
    # trained batch norm: its statistics are not the initial ones
    assert not torch.equal(own["features.0.1.running_var"], torch.ones_like(
        own["features.0.1.running_var"]))
