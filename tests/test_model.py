"""MoCo + BatchFormer wiring (docs/method.md#moco-v3, #batchformer): momentum update, frozen/trainable BatchFormer,
where BatchFormer sits, and torchvision-compatible backbones."""

import pytest
import torch
import torchvision
from torch import nn

from bfcl.optim import LARS
from bfcl.loss import PAIRS_SUM, moco_loss
from bfcl.model import MoCo, build_backbone

N, DIM, MLP_DIM, SIZE = 4, 8, 16, 8
FEATURES = 512  # resnet18


def small_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo("resnet18", "small", DIM, MLP_DIM, **kwargs)


def views(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, 3, SIZE, SIZE, generator=g)


def bn_buffers(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.named_buffers()}


def test_momentum_update_moves_parameters_only():
    model = small_moco(batchformer=True, bf_trainable=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # small integers: m·θk + (1-m)·θq is exact in fp32 for m = 0.75
        for p in model.parameters():
            p.copy_(torch.randint(-8, 8, p.shape, generator=g).float())
        for name, b in model.momentum_encoder.named_buffers():
            b.copy_(torch.randint(1, 5, b.shape, generator=g).to(b.dtype))  # differs from the base's
    base = {n: p.clone() for n, p in model.base_encoder.named_parameters()}
    before = {n: p.clone() for n, p in model.momentum_encoder.named_parameters()}
    buffers, bf = bn_buffers(model.momentum_encoder), {n: p.clone() for n, p in model.batchformer.named_parameters()}
    assert any(not torch.equal(base[n], before[n]) for n in base)

    model.update_momentum_encoder(0.75)

    for name, p in model.momentum_encoder.named_parameters():  # matched by name, not by order
        assert torch.equal(p, 0.75 * before[name] + 0.25 * base[name]), name
    for name, p in model.base_encoder.named_parameters():
        assert torch.equal(p, base[name]), name
    for name, b in model.momentum_encoder.named_buffers():  # running_mean/var, num_batches_tracked
        assert torch.equal(b, buffers[name]), name
    assert any(n.endswith("num_batches_tracked") for n in buffers)
    for name, p in model.batchformer.named_parameters():  # not part of either encoder
        assert torch.equal(p, bf[name]), name


def train_step(model: MoCo):
    x1, x2 = views()
    q1, q2, k1, k2 = model(x1, x2)
    loss = moco_loss(q1, q2, k1, k2, rank=0, temperature=1.0, bf_loss=PAIRS_SUM)
    loss.backward()
    return q1, q2, k1, k2


def test_frozen_batchformer_gets_no_gradient_and_stays_at_init():
    model = small_moco(batchformer=True).train()  # bf_trainable=False is the default
    bf_init = {n: p.clone() for n, p in model.batchformer.state_dict().items()}
    conv1 = model.base_encoder.backbone.conv1.weight.clone()
    optimizer = LARS([p for p in model.parameters() if p.requires_grad], lr=0.5, weight_decay=1e-6)
    train_step(model)
    assert all(p.grad is None for p in model.batchformer.parameters())
    assert model.base_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    optimizer.step()
    model.update_momentum_encoder(0.99)
    for name, value in model.batchformer.state_dict().items():
        assert torch.equal(value, bf_init[name]), name
    assert not torch.equal(model.base_encoder.backbone.conv1.weight, conv1)  # the step did train the backbone


def test_backbone_gets_gradient_through_frozen_batchformer():
    """A loss on the BatchFormer rows alone (plain rows unused) still reaches the backbone."""
    model = small_moco(batchformer=True).train()
    x1, _ = views()
    mixed = model.batchformer(model.base_encoder.backbone(x1))[N:]  # [N, C], BatchFormer rows only
    weights = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(3))  # LayerNorm output sums are constant
    (mixed * weights).sum().backward()
    assert model.base_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.batchformer.parameters())


def test_trainable_batchformer_gets_gradients():
    model = small_moco(batchformer=True, bf_trainable=True).train()
    train_step(model)
    grads = {n: p.grad for n, p in model.batchformer.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, g in grads.items():
        if name != "encoder_layer.self_attn.in_proj_bias":  # its key third has zero gradient (softmax shift)
            assert g.abs().sum() > 0, name


def test_projector_sees_plain_and_batchformer_rows_in_one_pass():
    model = small_moco(batchformer=True).train()
    seen = {"bf": [], "base": [], "momentum": [], "predictor": [], "features": []}
    model.batchformer.register_forward_pre_hook(lambda m, a: seen["bf"].append(a[0].shape))
    model.base_encoder.backbone.register_forward_hook(lambda m, a, out: seen["features"].append(out.detach()))
    model.base_encoder.projector.register_forward_pre_hook(lambda m, a: seen["base"].append(a[0].detach()))
    model.momentum_encoder.projector.register_forward_pre_hook(lambda m, a: seen["momentum"].append(a[0].shape))
    model.predictor.register_forward_pre_hook(lambda m, a: seen["predictor"].append(a[0].shape))
    x1, x2 = views()
    q1, q2, k1, k2 = model(x1, x2)
    assert [t.shape for t in (q1, q2, k1, k2)] == [(2 * N, DIM)] * 4
    assert seen["bf"] == [(N, FEATURES)] * 4  # each view separately, in both branches, never across views
    assert [t.shape for t in seen["base"]] == [(2 * N, FEATURES)] * 2  # one projector pass per view
    assert seen["momentum"] == [(2 * N, FEATURES)] * 2
    assert seen["predictor"] == [(2 * N, DIM)] * 2
    for features, projector_input in zip(seen["features"], seen["base"]):
        assert torch.equal(projector_input[:N], features)  # plain rows first


def test_eval_mode_has_no_batchformer_rows():
    model = small_moco(batchformer=True).eval()
    x1, x2 = views()
    with torch.no_grad():
        assert model.base_encoder.backbone(x1).shape == (N, FEATURES)
        assert [t.shape for t in model(x1, x2)] == [(N, DIM)] * 4


def test_without_batchformer_shapes_are_n():
    model = small_moco(batchformer=False).train()
    assert model.batchformer is None
    assert [t.shape for t in model(*views())] == [(N, DIM)] * 4


def test_batchformer_is_stored_once():
    keys = small_moco(batchformer=True).state_dict().keys()
    assert any(k.startswith("batchformer.") for k in keys)
    assert not any("batchformer" in k for k in keys if not k.startswith("batchformer."))


def test_small_stem():
    backbone = build_backbone("resnet18", "small")
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, nn.Identity)
    imagenet = build_backbone("resnet18", "imagenet")
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_zero_init_residual():
    backbone = build_backbone("resnet18")
    assert all(torch.equal(block.bn2.weight, torch.zeros_like(block.bn2.weight))
               for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for block in layer)


def test_backbone_keys_are_torchvisions():
    reference = torchvision.models.resnet18()
    result = reference.load_state_dict(build_backbone("resnet18").state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


def test_small_stem_backbone_equals_torchvision_with_the_same_stem():
    model = small_moco(batchformer=True).eval()
    reference = torchvision.models.resnet18()
    reference.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    result = reference.load_state_dict(model.base_encoder.backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    reference.fc = nn.Identity()
    x1, _ = views()
    with torch.no_grad():
        assert torch.equal(reference.eval()(x1), model.base_encoder.backbone(x1))


@pytest.mark.parametrize("arch, stem", [("resnet5", "small"), ("resnet18", "tiny")])
def test_unknown_arch_or_stem(arch, stem):
    with pytest.raises(ValueError, match="unknown"):
        build_backbone(arch, stem)
