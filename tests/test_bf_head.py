"""BatchFormer in the classifier (bfcl/bf_head.py) against its contract: [x ; BF(x)] through a shared
head with the labels duplicated, the plain classifier at evaluation, and an export that torchvision loads."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.vision_transformer import VisionTransformer

from bfcl.bf_head import BatchFormerClassifier, duplicate_targets, targets_for
from bfcl.model import build_backbone
from bfcl.optim import param_groups
from bfcl.pretrained import linear_head, set_head

N, K = 6, 3


def resnet_with_bf(seed: int = 0) -> BatchFormerClassifier:
    torch.manual_seed(seed)
    model = build_backbone("resnet18", "imagenet", image_size=32)  # the ImageNet stem is torchvision's own
    set_head(model, linear_head(model.feature_dim, K))
    return BatchFormerClassifier(model)


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_train_rows_are_plain_then_batchformer_through_one_head():
    model = resnet_with_bf().train()
    x = images()
    torch.manual_seed(7)
    logits = model(x)
    assert logits.shape == (2 * N, K)
    features = model.backbone(x)  # train-mode BN normalises with batch statistics: the same features again
    torch.manual_seed(7)  # the same dropout masks: the backbone draws no random numbers
    mixed = model.batchformer.encoder_layer(features.unsqueeze(0)).squeeze(0)  # ONE sequence of N samples
    expected = torch.cat([model.head(features), model.head(mixed)])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits[:N], logits[N:])  # the second half really went through BatchFormer


def test_labels_duplicated_batch_doubles_in_the_loss():
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(duplicate_targets(y), torch.tensor([0, 2, 1, 1, 0, 2, 0, 2, 1, 1, 0, 2]))
    soft = F.one_hot(y, K).float() * 0.7 + 0.1
    assert torch.equal(duplicate_targets(soft), torch.cat([soft, soft]))

    model = resnet_with_bf().train()
    torch.manual_seed(3)
    logits = model(images())
    loss = F.cross_entropy(logits, targets_for(logits, y))
    # Worked by hand: row i of 2N is sample i mod N and carries that sample's label.
    by_hand = sum(-torch.log_softmax(logits[i], 0)[y[i % N]] for i in range(2 * N)) / (2 * N)
    torch.testing.assert_close(loss, by_hand)
    assert targets_for(logits[:N], y) is y  # evaluation: one row per sample, targets as they are
    with pytest.raises(ValueError, match="7 logit rows for 6 targets"):
        targets_for(logits[:7], y)


def test_absent_at_evaluation_and_export_loads_strictly_into_torchvision():
    model = resnet_with_bf()
    model.train()
    model(images(2))  # move the BN running statistics away from their init
    model.eval()
    x = images()
    logits = model(x)
    assert logits.shape == (N, K)
    torch.testing.assert_close(logits, model.head(model.backbone(x)))  # the head on x alone

    state = model.classifier_state()
    assert not any("batchformer" in k for k in state)
    reference = torchvision.models.resnet18(num_classes=K)
    reference.load_state_dict(state, strict=True)
    torch.testing.assert_close(reference.eval()(x), logits)


def test_vit_export_loads_strictly_into_torchvision():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", image_size=32, patch_size=8)
    set_head(vit, linear_head(vit.feature_dim, K))
    model = BatchFormerClassifier(vit).eval()
    reference = VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=3, hidden_dim=192,
                                  mlp_dim=768, num_classes=K)
    reference.load_state_dict(model.classifier_state(), strict=True)  # heads.head.* back in place
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reference.eval()(x), model(x))


def test_it_trains_batchformer_head_and_backbone_move():
    model = resnet_with_bf().train()
    watched = {"batchformer": model.batchformer.encoder_layer.linear1.weight, "head": model.head.weight,
               "backbone": model.backbone.conv1.weight}
    before = {k: v.detach().clone() for k, v in watched.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        logits = model(images())
        loss = F.cross_entropy(logits, targets_for(logits, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, tensor in watched.items():
        assert not torch.equal(tensor, before[name]), f"{name} did not move"


def test_batchformer_param_groups_follow_the_plain_classifiers_rules():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", image_size=32, patch_size=8, stop_grad_conv1=False)
    set_head(vit, linear_head(vit.feature_dim, K))
    model = BatchFormerClassifier(vit)
    with model.plain_classifier() as classifier:
        groups, names = param_groups(classifier, "vit", weight_decay=0.05, layer_decay=0.75,
                                     batchformer=model.batchformer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) == len(names) == len(set(names))
    assert {id(p) for p in grouped} == {id(p) for p in trainable}  # every tensor exactly once
    setting, position = {}, 0  # names[i] is the i-th tensor over the groups in order
    for g in groups:
        for _ in g["params"]:
            setting[names[position]] = (g["weight_decay"], g["lr_scale"])
            position += 1
    assert setting["heads.head.weight"] == (0.05, 1.0)  # torchvision names: the ViT rules apply
    assert setting["conv_proj.weight"] == (0.05, pytest.approx(0.75 ** 13))
    assert setting["batchformer.encoder_layer.linear1.weight"] == (0.05, 1.0)
    assert setting["batchformer.encoder_layer.norm1.weight"] == (0.0, 1.0)  # norms and biases: no decay
    assert setting["batchformer.encoder_layer.linear1.bias"] == (0.0, 1.0)
    assert isinstance(model.backbone.heads, torch.nn.Identity)  # the head went back to the wrapper
    assert model.backbone(torch.randn(2, 3, 32, 32)).shape == (2, vit.feature_dim)


def test_fine_tuning_step_trains_on_all_2n_rows(tmp_path, monkeypatch):
    """probe.py --mode finetune --bf-head 1, one step: the logged loss is the soft-target
    cross-entropy over all 2N rows of the model's output (the labels twice), worked by hand, and
    BatchFormer's weights moved (they get no gradient if its N extra rows are left out)."""
    import json

    import probe
    from bfcl.finetune_recipe import MixupCutmix
    from scripts import PROBE_TINY
    from test_probe import colour_folder

    seen = {"logits": [], "targets": []}
    forward, mix = BatchFormerClassifier.forward, MixupCutmix.__call__

    def recorded_forward(self, x):
        out = forward(self, x)
        if self.training:
            if not seen["logits"]:
                seen["model"], seen["before"] = self, {k: v.detach().clone()
                                                       for k, v in self.batchformer.state_dict().items()}
            seen["logits"].append(out.detach().float().clone())
        return out

    def recorded_mix(self, images, labels):
        images, targets = mix(self, images, labels)
        seen["targets"].append(targets.clone())
        return images, targets

    monkeypatch.setattr(BatchFormerClassifier, "forward", recorded_forward)
    monkeypatch.setattr(MixupCutmix, "__call__", recorded_mix)
    data = colour_folder(str(tmp_path / "data"), train_per_class=4, val_per_class=2, size=8)
    out = tmp_path / "ft"
    smoothing = 0.1
    assert probe.main([*PROBE_TINY, "--data", data, "--output-dir", str(out), "--mode", "finetune", "--bf-head", "1",
                       "-b", "8", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "1", "--log-every", "1",
                       "--mixup", "0", "--cutmix", "0", "--label-smoothing", str(smoothing)]) == 0

    (logits,), (targets,) = seen["logits"], seen["targets"]
    assert logits.shape == (16, 4) and targets.shape == (8, 4)  # [2N, K] rows for N = 8 one-hot targets
    soft = torch.cat([targets, targets]) * (1 - smoothing) + smoothing / 4
    by_hand = -(soft * torch.log_softmax(logits.double(), 1)).sum(1).mean()
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert logged[0]["step"] == 1 and logged[0]["loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    after = seen["model"].batchformer.state_dict()
    moved = [k for k, v in seen["before"].items() if not torch.equal(v, after[k])]
    assert "encoder_layer.linear1.weight" in moved and "encoder_layer.self_attn.in_proj_weight" in moved
