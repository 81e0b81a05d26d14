"""Loading pretrained backbones: every accepted layout maps to torchvision keys with the right
values, bad files fail in one line, and the frozen-backbone check catches any moved tensor; probe.py
refuses an export whose metadata or weights no run could have written."""

import copy

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import probe

from bfcl.checkpoint import CheckpointError, save_checkpoint
from bfcl.export import export_backbone
from bfcl.model import MoCo, mlp
from bfcl.pretrained import (assert_backbone_unchanged, backbone_tensors, guess_arch_stem, load_backbone_state,
                             probe_model)
from scripts import error_of


def torchvision_backbone_keys(arch: str) -> set:
    return {k for k in getattr(torchvision.models, arch)().state_dict() if not k.startswith("fc.")}


def randomise(module: nn.Module, seed: int) -> None:
    """Distinct random values in every tensor, BN buffers included, so a mix-up cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else 0.0))


def original_moco_state() -> dict:
    """The state_dict of the original main_moco.py (BatchFormer fork): DDP's module. prefix,
    the projector in base_encoder.fc, a momentum encoder, a predictor, and BatchFormer layers."""
    class TransformerDecorator(nn.Module):  # the fork's BatchFormer wrapper
        def __init__(self, dim):
            super().__init__()
            self.encoder_layers = nn.TransformerEncoderLayer(dim, 4, dim, 0.5)

    class Original(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_encoder = torchvision.models.resnet18(zero_init_residual=True)
            self.base_encoder.fc = nn.Sequential(mlp(512, 64, 32, last_bn=True))
            self.base_encoder.bf = TransformerDecorator(512)
            self.momentum_encoder = copy.deepcopy(self.base_encoder)
            self.predictor = mlp(32, 64, 32, last_bn=False)

    model = Original()
    randomise(model.base_encoder, seed=1)
    randomise(model.momentum_encoder, seed=2)  # different values: taking the wrong encoder shows
    return nn.ModuleDict({"module": model}).state_dict()


def test_original_pth_tar_maps_base_encoder_minus_fc(tmp_path):
    state_dict = original_moco_state()
    path = str(tmp_path / "checkpoint_0099.pth.tar")
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": state_dict,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.6, "params": [0, 1]}]}}, path)
    state, info = load_backbone_state(path)

    assert set(state) == torchvision_backbone_keys("resnet18")
    for key, value in state.items():
        assert torch.equal(value, state_dict[f"module.base_encoder.{key}"]), key
    assert info["arch"] == "resnet18" and info["epoch"] == 100
    assert info["ignored"] == ["module.base_encoder.bf", "module.base_encoder.fc", "module.momentum_encoder",
                               "module.predictor"]
    model = probe_model("resnet18", "imagenet", state, num_classes=10)  # only fc.weight/bias missing
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_original_checkpoint_of_an_unknown_arch_is_refused(tmp_path):
    """ViT-S/B files load now (tests/test_vit_moco.py); an arch bfcl does not build is refused by name."""
    path = str(tmp_path / "vit-h-300ep.pth.tar")
    torch.save({"arch": "vit_huge", "state_dict": {"module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(3)}},
               path)
    with pytest.raises(CheckpointError, match="holds a vit_huge"):
        load_backbone_state(path)


def test_weights_only_loading_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": Payload()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        load_backbone_state(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def tiny_moco(stem: str) -> MoCo:
    torch.manual_seed(0)
    model = MoCo("resnet18", stem, dim=16, mlp_dim=32, batchformer=True)
    randomise(model, seed=3)
    return model


def export_like_train_py(model: MoCo, path: str, stem: str) -> None:
    """What train.py writes as <output-dir>/backbone.safetensors."""
    export_backbone(model.state_dict(), path, arch="resnet18", stem=stem, image_size=16, step=12)


def test_bfcl_checkpoint_folder_run_folder_and_export(tmp_path):
    model = tiny_moco("small")
    expected = {k[len("base_encoder.backbone."):]: v for k, v in model.state_dict().items()
                if k.startswith("base_encoder.backbone.")}
    folder = save_checkpoint(str(tmp_path), 12, model.state_dict(), {},
                             {"config": {"arch": "resnet18", "stem": "small", "image_size": 16}}, keep=1)
    export_like_train_py(model, str(tmp_path / "backbone.safetensors"), "small")

    for path in (folder, str(tmp_path), str(tmp_path / "backbone.safetensors")):
        state, info = load_backbone_state(path)
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], v) for k, v in expected.items()), path
        assert (info["arch"], info["stem"], info["step"]) == ("resnet18", "small", 12)
    assert load_backbone_state(folder)[1]["ignored"] == ["base_encoder.projector", "batchformer", "momentum_encoder",
                                                         "predictor"]
    assert load_backbone_state(folder)[1]["image_size"] == 16


def test_export_loads_into_torchvision(tmp_path):
    """README's promise: backbone.safetensors loads into torchvision.models.resnet18() with only
    fc missing, and then computes the same features as the trained backbone."""
    model = tiny_moco("imagenet")
    path = str(tmp_path / "backbone.safetensors")
    export_like_train_py(model, path, "imagenet")

    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(load_file(path), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and unexpected == []
    resnet.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(resnet.eval()(x), model.base_encoder.backbone.eval()(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_plain_torchvision_state_dicts_and_arch_guess(tmp_path, arch):
    reference = getattr(torchvision.models, arch)().state_dict()
    files = {"plain.pth": reference, "wrapped.pth": {"state_dict": {f"module.{k}": v for k, v in reference.items()}}}
    for name, obj in files.items():
        torch.save(obj, str(tmp_path / name))
    save_file(reference, str(tmp_path / "plain.safetensors"))
    for name in (*files, "plain.safetensors"):
        state, info = load_backbone_state(str(tmp_path / name))
        assert set(state) == torchvision_backbone_keys(arch), name
        assert all(torch.equal(state[k], reference[k]) for k in state), name
        assert guess_arch_stem(state) == (arch, "imagenet")
        assert "arch" not in info


def one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_checkpoint_of_another_arch_or_stem_is_one_line_error():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    with pytest.raises(CheckpointError) as e:
        probe_model("resnet18", "small", state, num_classes=4)
    message = one_line(e)
    assert "resnet18 with the small stem" in message and "conv1.weight" in message
    assert "looks like resnet18 with the imagenet stem" in message
    with pytest.raises(CheckpointError) as e:
        probe_model("resnet50", "imagenet", state, num_classes=4)
    assert "does not fit resnet50" in one_line(e) and "looks like resnet18" in one_line(e)


def test_missing_and_truncated_files_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_backbone_state(str(tmp_path / "nope.pth.tar"))
    one_line(e)
    state = torchvision.models.resnet18().state_dict()
    save_file(state, str(tmp_path / "full.safetensors"))
    torch.save({"state_dict": state}, str(tmp_path / "full.pth.tar"))
    for name in ("full.safetensors", "full.pth.tar"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as e:
            load_backbone_state(str(cut))
        assert str(cut) in one_line(e) and "truncated" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without meta.json or backbone.safetensors"):
        load_backbone_state(str(tmp_path / "empty"))


def test_probe_model_head_and_frozen_backbone_check():
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    model = probe_model("resnet18", "imagenet", state, num_classes=1000)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)  # N(0, 0.01²), 512k draws
    assert torch.equal(model.fc.bias, torch.zeros(1000))

    reference = backbone_tensors(model)
    assert set(reference) == set(state)  # every backbone tensor, BN buffers included
    assert_backbone_unchanged(model, reference)
    model.fc.weight.data.add_(1.0)  # the head may move
    assert_backbone_unchanged(model, reference)
    for key in ("layer3.1.bn2.running_mean", "layer1.0.conv1.weight", "bn1.num_batches_tracked"):
        moved = probe_model("resnet18", "imagenet", state, num_classes=1000)
        moved.state_dict()[key].add_(1)
        with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
            assert_backbone_unchanged(moved, reference)


def test_bn_head_leaves_only_head_tensors_missing():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    model = probe_model("resnet18", "imagenet", state, num_classes=3, bn_head=True)
    assert not any(p.requires_grad for p in model.fc[0].parameters()) and model.fc[0].affine is False
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.1.weight", "fc.1.bias"]


def export_file(export, tmp_path, metadata: dict | None = None, edit=None) -> str:
    tensors = load_file(export)
    if edit is not None:
        edit(tensors)
    path = str(tmp_path / "backbone.safetensors")
    save_file(tensors, path, {"format": "bfcl-backbone-1", "arch": "resnet18", "stem": "imagenet",
                              "image_size": "16", "step": "4", **(metadata or {})})
    return path


@pytest.mark.parametrize("metadata, expected", [
    ({"image_size": "100000"}, "metadata image_size='100000' is not an integer in [8, 4096]"),
    ({"step": "-3"}, "metadata step='-3' is not an integer"),
    ({"arch": "resnet1000"}, "metadata arch='resnet1000' is not one of"),
    ({"stem": "huge"}, "metadata stem='huge' is not one of"),
])
def test_export_metadata_is_validated(data, export, tmp_path, metadata, expected):
    path = export_file(export, tmp_path, metadata)
    message = error_of(probe.main, ["--pretrained", path, "--data", data, "--mode", "knn", "--workers", "0",
                                    "--output-dir", str(tmp_path / "out")])
    assert expected in message


def nan_weight(t):
    t["conv1.weight"][0, 0, 0, 0] = float("nan")


def int_weight(t):
    t["fc_like"] = torch.zeros(3, dtype=torch.int64)
    t["conv1.weight"] = t["conv1.weight"].to(torch.int32)


def negative_variance(t):
    t["bn1.running_var"][0] = -1.0


@pytest.mark.parametrize("edit, expected", [(nan_weight, "non-finite"), (int_weight, "not floating"),
                                            (negative_variance, "negative")])
def test_impossible_weights_are_refused_by_the_probe(data, export, tmp_path, edit, expected):
    path = export_file(export, tmp_path, edit=edit)
    message = error_of(probe.main, ["--pretrained", path, "--data", data, "--mode", "knn", "--workers", "0",
                                    "--output-dir", str(tmp_path / "out")])
    assert expected in message
