"""train.py --init-from: every accepted source puts exactly its backbone into both encoders, the rest
of MoCo stays at the seeded fresh init, wrong weights are refused in one line, and a run started from
weights resumes bit-exactly from its own checkpoint (bfcl/init_from.py)."""

import json
import os
import urllib.error

import pytest
import torch
import torchvision

from bfcl.checkpoint import save_checkpoint
from bfcl.export import export_backbone
from bfcl.init_from import InitError, load_into_both_encoders, read_init_weights, torchvision_weights_file
from bfcl.model import MoCo
from bfcl.schedules import learning_rate, momentum
from scripts import STEPS, assert_same_weights, checkpoint_steps, final_weights, metrics, run, train_cmd

SMALL = dict(arch="resnet18", stem="small", patch_size=16, image_size=16)


def fresh_moco(seed=0, arch="resnet18", stem="small", **vit) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(arch, stem, dim=32, mlp_dim=64, batchformer=True, **vit)


def source_backbone() -> dict:
    """A resnet18 small-stem backbone (torchvision keys) unlike a seed-0 init: seed 7, BN stats moved."""
    moco = fresh_moco(seed=7)
    with torch.no_grad():
        for name, t in moco.base_encoder.backbone.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    return {k: v.clone() for k, v in moco.base_encoder.backbone.state_dict().items()}


def torchvision_resnet18_small(backbone: dict) -> dict:
    """The same backbone as a full torchvision resnet18 state dict, classifier (fc) included."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    state = model.state_dict()
    state.update(backbone)
    return state


def write_source(kind: str, root, backbone: dict) -> str:
    """One file or folder of each kind probe.py --pretrained reads, holding `backbone`."""
    moco_state = {**fresh_moco(seed=3).state_dict()}
    moco_state.update({"base_encoder.backbone." + k: v for k, v in backbone.items()})
    if kind == "export":
        path = str(root / "backbone.safetensors")
        export_backbone(moco_state, path, arch="resnet18", stem="small", image_size=16, step=4)
    elif kind == "run-folder":
        path = str(root / "run")
        os.makedirs(path)
        export_backbone(moco_state, os.path.join(path, "backbone.safetensors"), arch="resnet18", stem="small",
                        image_size=16, step=4)
    elif kind == "checkpoint":
        meta = {"version": "test", "config": {"arch": "resnet18", "stem": "small", "image_size": 16}, "epoch": 1.0}
        path = save_checkpoint(str(root / "run"), 4, moco_state, {}, meta, keep=0)
    elif kind == "torchvision-pth":
        path = str(root / "resnet18.pth")
        torch.save(torchvision_resnet18_small(backbone), path)
    elif kind == "moco-v3-pth-tar":
        path = str(root / "checkpoint_0099.pth.tar")
        state = {"module.base_encoder." + k: v for k, v in torchvision_resnet18_small(backbone).items()
                 if not k.startswith("fc.")}
        state["module.base_encoder.fc.0.weight"] = torch.randn(64, 512)  # MoCo v3's projector sits in fc
        state.update({"module.momentum_encoder." + k: v.clone() for k, v in backbone.items()})
        state["module.predictor.0.weight"] = torch.randn(64, 32)
        torch.save({"arch": "resnet18", "epoch": 99, "state_dict": state}, path)
    return path


@pytest.mark.parametrize("kind", ["export", "run-folder", "checkpoint", "torchvision-pth", "moco-v3-pth-tar"])
def test_each_source_loads_exactly_the_backbone_into_both_encoders(tmp_path, kind):
    backbone = source_backbone()
    init = read_init_weights(write_source(kind, tmp_path, backbone), **SMALL)
    assert len(init.sha256) == 64 and os.path.isfile(init.path)
    model, reference = fresh_moco(seed=0), fresh_moco(seed=0)
    load_into_both_encoders(model, init.state)
    for encoder in (model.base_encoder, model.momentum_encoder):
        got = encoder.backbone.state_dict()
        assert got.keys() == backbone.keys()
        for k in backbone:
            assert torch.equal(got[k], backbone[k]), (kind, k)
    # everything but the two backbones is the fresh seed-0 init, as without --init-from
    expected = {k: v for k, v in reference.state_dict().items() if ".backbone." not in k}
    got = {k: v for k, v in model.state_dict().items() if ".backbone." not in k}
    assert any(k.startswith("batchformer.") for k in got) and any(k.startswith("predictor.") for k in got)
    assert_same_weights(got, expected)


def test_sha256_is_the_tensor_files(tmp_path):
    import hashlib
    path = write_source("export", tmp_path, source_backbone())
    init = read_init_weights(path, **SMALL)
    assert init.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    folder = write_source("checkpoint", tmp_path, source_backbone())
    assert read_init_weights(folder, **SMALL).path == os.path.join(folder, "model.safetensors")


@pytest.mark.parametrize("flags, named", [
    (dict(arch="resnet34", stem="small"), "arch resnet18, but this run has arch resnet34"),
    (dict(arch="resnet18", stem="imagenet"), "stem small, but this run has stem imagenet"),
])
def test_wrong_resnet_refused_in_one_line(tmp_path, flags, named):
    path = write_source("torchvision-pth", tmp_path, source_backbone())
    with pytest.raises(InitError) as e:
        read_init_weights(path, patch_size=16, image_size=16, **flags)
    assert named in str(e.value) and "\n" not in str(e.value) and "-a resnet18 --stem small" in str(e.value)


@pytest.mark.parametrize("patch, size, named", [(8, 32, "patch_size 4"), (4, 16, "image_size 32")])
def test_wrong_vit_patch_or_size_refused_in_one_line(tmp_path, patch, size, named):
    vit = fresh_moco(arch="vit_tiny", stem="imagenet", image_size=32, patch_size=4)
    path = str(tmp_path / "vit.safetensors")
    export_backbone(vit.state_dict(), path, arch="vit_tiny", image_size=32, patch_size=4, step=0)
    read_init_weights(path, arch="vit_tiny", stem="imagenet", patch_size=4, image_size=32)  # the matching run
    with pytest.raises(InitError) as e:
        read_init_weights(path, arch="vit_tiny", stem="imagenet", patch_size=patch, image_size=size)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_unexpected_and_missing_keys_refused_naming_them(tmp_path):
    state = torchvision_resnet18_small(source_backbone())
    torch.save({**state, "extra_head.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(InitError, match="unexpected tensors extra_head") as e:
        read_init_weights(str(tmp_path / "extra.pth"), **SMALL)
    assert "\n" not in str(e.value)
    torch.save({**state, "layer1.0.extra.weight": torch.zeros(3)}, tmp_path / "inside.pth")
    with pytest.raises(InitError, match="unexpected layer1.0.extra.weight"):
        load_into_both_encoders(fresh_moco(), read_init_weights(str(tmp_path / "inside.pth"), **SMALL).state)
    del state["layer1.0.bn1.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(InitError, match="missing layer1.0.bn1.weight"):
        load_into_both_encoders(fresh_moco(), read_init_weights(str(tmp_path / "missing.pth"), **SMALL).state)


def test_torchvision_weights_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    weights, cached = torchvision_weights_file("resnet18")
    assert cached == str(tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    # offline: the one-line error says where the file goes
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(InitError) as e:
        read_init_weights("torchvision", arch="resnet18", stem="imagenet", patch_size=16, image_size=224)
    assert cached in str(e.value) and weights.url in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    # a file already in the cache is what torchvision's API returns (no download)
    torch.manual_seed(5)
    reference = torchvision.models.resnet18().state_dict()
    os.makedirs(os.path.dirname(cached))
    torch.save(reference, cached)
    init = read_init_weights("torchvision", arch="resnet18", stem="imagenet", patch_size=16, image_size=224)
    assert init.path == cached and "IMAGENET1K" in init.source
    model = fresh_moco(arch="resnet18", stem="imagenet")
    load_into_both_encoders(model, init.state)
    for k, v in model.momentum_encoder.backbone.state_dict().items():
        assert torch.equal(v, reference[k]), k
    with pytest.raises(InitError, match="--stem imagenet"):
        read_init_weights("torchvision", **SMALL)
    with pytest.raises(InitError, match="no ImageNet weights for vit_tiny"):
        read_init_weights("torchvision", arch="vit_tiny", stem="imagenet", patch_size=16, image_size=224)


@pytest.mark.slow
def test_run_from_weights_starts_at_step_0_and_resumes_bit_exactly(tiny_data, straight_run, tmp_path):
    source = str(straight_run)  # a run folder: its backbone.safetensors
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = run(train_cmd(tiny_data, straight, "--init-from", source))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "initialised from" in result.stdout and "bfcl backbone export" in result.stdout
    derived = json.load(open(straight / "config.json"))
    assert derived["config"]["init_from"] == source
    assert derived["derived"]["initialised from"].endswith(")") and "sha256 " in derived["derived"]["initialised from"]
    # the schedules start at step 0: the first record is step 1 with the lr and m of step 0
    records = [r for r in metrics(straight) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert r["lr"] == pytest.approx(learning_rate(r["step"] - 1, STEPS, 4, 0.6 * 8 / 256), rel=1e-12)
        assert r["m"] == pytest.approx(momentum(r["step"] - 1, STEPS, 0.99, True), rel=1e-12)
    # and the weights after the run differ from those of a run from scratch
    assert not torch.equal(final_weights(straight)["base_encoder.backbone.conv1.weight"],
                           final_weights(straight_run)["base_encoder.backbone.conv1.weight"])

    first = run(train_cmd(tiny_data, stopped, "--init-from", source, "--max-steps", "3", "--save-every", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert checkpoint_steps(stopped) == [3]
    second = run(train_cmd(tiny_data, stopped, "--init-from", source, "--save-every", "3"))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "its checkpoint resumed" in second.stdout
    assert_same_weights(final_weights(stopped), final_weights(straight))

    # another --init-from (or none) is not a resume of this run
    other = run(train_cmd(tiny_data, stopped, "--init-from", "torchvision"))
    assert other.returncode != 0 and "--init-from" in other.stderr and len(other.stderr.strip().splitlines()) == 1


def test_vit_export_loads_into_both_encoders_of_a_vit(tmp_path):
    torch.manual_seed(11)
    source = MoCo("vit_tiny", "imagenet", dim=16, mlp_dim=32, image_size=32, patch_size=4)
    with torch.no_grad():
        for t in source.base_encoder.backbone.state_dict().values():
            t.add_(torch.randn_like(t) * 0.01)  # the position embedding too: loaded, not re-made
    path = str(tmp_path / "vit.safetensors")
    export_backbone(source.state_dict(), path, arch="vit_tiny", image_size=32, patch_size=4, step=3)
    init = read_init_weights(path, arch="vit_tiny", stem="imagenet", patch_size=4, image_size=32)
    model = fresh_moco(arch="vit_tiny", stem="imagenet", image_size=32, patch_size=4)
    load_into_both_encoders(model, init.state)
    expected = source.base_encoder.backbone.state_dict()
    for encoder in (model.base_encoder, model.momentum_encoder):
        assert_same_weights(encoder.backbone.state_dict(), expected)
    # what the run freezes stays frozen, now at the loaded values
    assert not model.base_encoder.backbone.conv_proj.weight.requires_grad
    assert not model.base_encoder.backbone.encoder.pos_embedding.requires_grad


@pytest.mark.slow
def test_train_refuses_other_weights_in_one_line_and_reads_torchvision_from_the_cache(tiny_data, tmp_path):
    wrong = str(tmp_path / "resnet34.pth")
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    out = tmp_path / "refused"
    result = run(train_cmd(tiny_data, out, "--init-from", wrong))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "holds arch resnet34, stem imagenet, but this run has arch resnet18, stem small" in result.stderr
    assert checkpoint_steps(out) == [] and not os.path.exists(out / "metrics.jsonl")

    # --init-from torchvision with the file already in torch hub's cache (TORCH_HOME): no network needed
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    out = tmp_path / "torchvision"
    result = run(train_cmd(tiny_data, out, "--init-from", "torchvision", "--stem", "imagenet", "--max-steps", "1"),
                 TORCH_HOME=str(tmp_path / "torch-home"))
    assert result.returncode == 0, result.stdout + result.stderr
    derived = json.load(open(out / "config.json"))["derived"]["initialised from"]
    import hashlib
    assert derived == (f"torchvision {weights} from {cached} "
                       f"(sha256 {hashlib.sha256(cached.read_bytes()).hexdigest()})")
