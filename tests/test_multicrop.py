"""Multi-crop (issue 37, docs/multicrop.md): more global views, local crops, BatchFormer over several
views, the ViT's smaller grid; the loss against a plain loop, the momentum encoder kept away from
local views, the defaults identical to the code before multi-crop, and a resume with local crops."""

import argparse
import math
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import train
from bfcl.augment import LOCAL_SCALE, BatchedMultiViews, BatchedTwoViews, local_crop_size
from bfcl.errors import ConfigError
from bfcl.loss import BF_LOSSES, JOINT, moco_loss, multiview_loss, pair_loss, view_pairs
from bfcl.model import JOINT_VIEWS, PER_VIEW, MoCo, build_backbone, layer4_input_side
from bfcl.optim import build_optimizer, param_groups
from bfcl.vit import resample_pos_embedding
from scripts import REPO, STEPS, TINY, VIT_TINY, assert_same_weights, final_weights, metrics, run, train_cmd

B, DIM, MLP, SIZE, LOCAL = 4, 8, 16, 16, 8
FEATURES = 512  # resnet18
BASE_COMMIT = "8b6d381"  # the last commit before multi-crop


# --- the loss -------------------------------------------------------------------------------------

def ce_row(q_row: torch.Tensor, keys: torch.Tensor, positive: int, t: float) -> float:
    """One row's softmax cross-entropy, written out in Python floats."""
    unit = lambda v: [a / math.sqrt(sum(b * b for b in v)) for a in v.tolist()]
    qi = unit(q_row)
    logits = [sum(a * b for a, b in zip(qi, unit(k))) / t for k in keys]
    return math.log(sum(math.exp(s) for s in logits)) - logits[positive]


def reference_pair(q: torch.Tensor, k_all: torch.Tensor, rank: int, t: float, bf_loss) -> float:
    """One query view against one key view, row by row, without bfcl.loss: for a 4-term variant,
    the key blocks are picked out of the gathered [p0 plain, p0 BF, p1 plain, p1 BF, ...] by hand."""
    if bf_loss is None or bf_loss == JOINT:
        n = q.shape[0]
        return sum(ce_row(q[i], k_all, i + n * rank, t) for i in range(n)) / n * 2 * t
    n = q.shape[0] // 2
    processes = k_all.shape[0] // (2 * n)
    total = 0.0
    for x in range(2):  # query half: plain, BatchFormer
        for y in range(2):  # key half
            keys = torch.cat([k_all[p * 2 * n + y * n: p * 2 * n + (y + 1) * n] for p in range(processes)])
            total += sum(ce_row(q[x * n + i], keys, i + n * rank, t) for i in range(n)) / n * 2 * t
    return total / 4 if bf_loss == "pairs-mean" else total


def reference_multiview(q_global, q_local, k_global_all, rank, t, bf_loss) -> float:
    """docs/multicrop.md#loss as a loop: global view i's query against every other global view's
    key, every local view's query against every global view's key; 2 x the mean over those pairs."""
    terms = []
    for i, q in enumerate(q_global):
        for g, k in enumerate(k_global_all):
            if g != i:
                terms.append(reference_pair(q, k, rank, t, bf_loss))
    for q in q_local:
        for k in k_global_all:  # keys of the global views only
            terms.append(reference_pair(q, k, rank, t, bf_loss))
    return 2 * sum(terms) / len(terms)


def random_views(views: int, rows: int, processes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = [torch.randn(rows, 6, generator=g, dtype=torch.float64) for _ in range(views)]
    k = [torch.randn(processes * rows, 6, generator=g, dtype=torch.float64) for _ in range(views)]
    return q, k


@pytest.mark.parametrize("bf_loss", [None, *BF_LOSSES])
@pytest.mark.parametrize("global_views,local_views", [(2, 0), (2, 3), (3, 0), (3, 2)])
def test_multiview_loss_equals_a_plain_loop(bf_loss, global_views, local_views):
    """Two processes (rank 1): which views are queries, which are keys, the positives' offsets
    and the 2 x mean, against the row-by-row reference."""
    rows = 2 * B if bf_loss else B
    q_global, k_global = random_views(global_views, rows, 2, seed=1)
    q_local, _ = random_views(local_views, rows, 2, seed=2)
    got = multiview_loss(q_global, q_local, k_global, 1, 0.2, bf_loss).item()
    assert got == pytest.approx(reference_multiview(q_global, q_local, k_global, 1, 0.2, bf_loss), abs=2e-5)


def test_pairs_are_queries_of_every_view_against_keys_of_the_other_global_views():
    assert view_pairs(2, 0) == [("global", 0, 1), ("global", 1, 0)]
    assert view_pairs(2, 2) == [("global", 0, 1), ("global", 1, 0), ("local", 0, 0), ("local", 0, 1),
                                ("local", 1, 0), ("local", 1, 1)]
    assert len(view_pairs(4, 6)) == 4 * 3 + 6 * 4


@pytest.mark.parametrize("bf_loss", [None, *BF_LOSSES])
def test_two_global_views_give_moco_v3s_symmetric_loss(bf_loss):
    """V = 2, no local views: ctr(q1, k2) + ctr(q2, k1), moco_loss up to the order of the additions."""
    rows = 2 * B if bf_loss else B
    (q1, q2), (k1, k2) = random_views(2, rows, 1, seed=3)
    expected = moco_loss(q1, q2, k1, k2, 0, 1.0, bf_loss)
    assert torch.allclose(multiview_loss([q1, q2], [], [k1, k2], 0, 1.0, bf_loss), expected, rtol=1e-6)


# --- the model ------------------------------------------------------------------------------------

def small_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo("resnet18", "small", DIM, MLP, **kwargs).train()


def inputs(global_views: int = 2, local_views: int = 2, local_size: int = LOCAL, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(global_views)]
    local = torch.randn(local_views * B, 3, local_size, local_size, generator=g) if local_views else None
    return views, local


def forward(model, views, local, **kwargs):
    return model(views[0], views[1], more_views=tuple(views[2:]), local_views=local, **kwargs)


@pytest.mark.parametrize("bf_views", [PER_VIEW, JOINT_VIEWS])
@pytest.mark.parametrize("batchformer", [False, True])
def test_the_momentum_encoder_never_sees_a_local_view(batchformer, bf_views):
    """Every input the momentum encoder's backbone gets is a global view, and its keys do not
    change when the local views do (fails if a local view reaches it in any form)."""
    model = small_moco(batchformer=batchformer)
    seen = []
    model.momentum_encoder.backbone.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    momentum_projector = []
    model.momentum_encoder.projector.register_forward_pre_hook(lambda m, a: momentum_projector.append(a[0].shape))
    views, local = inputs(global_views=3, local_views=2)
    torch.manual_seed(5)
    _, q_local, keys = forward(model, views, local, bf_views=bf_views)
    assert len(seen) == 3 and all(x is v for x, v in zip(seen, views))
    rows = 2 * B if batchformer else B
    assert momentum_projector == [(rows, FEATURES)] * 3
    assert len(q_local) == 2 and len(keys) == 3
    _, other_local = inputs(global_views=3, local_views=2, seed=9)
    torch.manual_seed(5)
    _, _, keys_again = forward(model, views, other_local, bf_views=bf_views)
    if bf_views == PER_VIEW or not batchformer:  # a joint BatchFormer on the base side draws more dropout first
        for k, again in zip(keys, keys_again):
            assert torch.equal(k, again)


@pytest.mark.parametrize("bf_views", [PER_VIEW, JOINT_VIEWS])
def test_shared_heads_with_local_views(bf_views):
    """BatchFormer's shared-head rule with local crops: every projector and predictor pass gets a
    view group's plain rows (the backbone features, first) and its BatchFormer rows together;
    BatchFormer sees each view's B samples (per-view) or all base-side views as one sequence (joint)."""
    model = small_moco(batchformer=True)
    seen = {"bf": [], "features": [], "base": [], "momentum": [], "predictor": []}
    model.batchformer.register_forward_pre_hook(lambda m, a: seen["bf"].append(a[0].shape))
    model.base_encoder.backbone.register_forward_hook(lambda m, a, out: seen["features"].append(out.detach()))
    model.base_encoder.projector.register_forward_pre_hook(lambda m, a: seen["base"].append(a[0].detach()))
    model.momentum_encoder.projector.register_forward_pre_hook(lambda m, a: seen["momentum"].append(a[0].shape))
    model.predictor.register_forward_pre_hook(lambda m, a: seen["predictor"].append(a[0].shape))
    views, local = inputs(global_views=2, local_views=3)
    q_global, q_local, k_global = forward(model, views, local, bf_views=bf_views)
    assert [q.shape for q in q_global + q_local + k_global] == [(2 * B, DIM)] * 7
    if bf_views == PER_VIEW:  # base: 2 global + 3 local views; momentum: 2 global views
        assert seen["bf"] == [(B, FEATURES)] * 7
    else:
        assert seen["bf"] == [(5 * B, FEATURES), (2 * B, FEATURES)]
    # base projector: each global view's 2B rows, then all local rows in one pass
    assert [t.shape for t in seen["base"]] == [(2 * B, FEATURES)] * 2 + [(3 * 2 * B, FEATURES)]
    assert seen["momentum"] == [(2 * B, FEATURES)] * 2
    assert seen["predictor"] == [(2 * B, DIM)] * 2 + [(3 * 2 * B, DIM)]
    global_features, local_features = seen["features"][:2], seen["features"][2].split(B)
    for features, projector_input in zip(global_features, seen["base"][:2]):
        assert torch.equal(projector_input[:B], features)  # plain rows first
    local_rows = seen["base"][2].split(2 * B)
    for features, rows in zip(local_features, local_rows):
        assert torch.equal(rows[:B], features)
        assert not torch.equal(rows[B:], features)  # BatchFormer rows differ


def test_per_view_batchformer_on_two_views_is_the_released_forward():
    """--bf-views per-view through forward_views on MoCo v3's two views: forward()'s numbers."""
    model = small_moco(batchformer=True)
    views, _ = inputs(local_views=0)
    torch.manual_seed(3)
    expected = model(*views)
    torch.manual_seed(3)
    q_global, q_local, k_global = model.forward_views(views, None)
    assert q_local == []
    for got, want in zip(q_global + k_global, expected):
        assert torch.equal(got, want)


def test_local_views_train_the_base_side():
    """A loss on the local views' queries alone reaches the backbone and the heads."""
    model = small_moco(batchformer=True)
    views, local = inputs()
    _, q_local, k_global = forward(model, views, local)
    sum(pair_loss(q, k, 0, 0.2, "pairs-sum") for q in q_local for k in k_global).backward()
    assert model.base_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


# --- the ViT --------------------------------------------------------------------------------------

VIT = dict(arch="vit_tiny", stem="imagenet", dim=16, mlp_dim=32, image_size=32, patch_size=8)


def test_vit_trains_with_local_crops_of_another_size():
    """32 px global views, 16 px local crops (2 x 2 patches instead of 4 x 4): finite losses over
    three AdamW steps, gradients from the local views alone reach the blocks and the cls token,
    the frozen position embedding stays as it was and the 16 px crops use it resampled."""
    torch.manual_seed(0)
    model = MoCo(**VIT, batchformer=True).train()
    backbone = model.base_encoder.backbone
    pos = backbone.encoder.pos_embedding.clone()
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]
    local = torch.randn(2 * B, 3, 16, 16, generator=g)

    _, q_local, k_global = model.forward_views(views, local)
    sum(pair_loss(q, k, 0, 0.2, "pairs-sum") for q in q_local for k in k_global).backward()
    assert backbone.class_token.grad.abs().sum() > 0
    assert backbone.encoder.layers[0].self_attention.in_proj_weight.grad.abs().sum() > 0
    model.zero_grad()

    groups, _ = param_groups(model)
    optimizer = build_optimizer("adamw", groups, weight_decay=0.1)
    for _ in range(3):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        q_global, q_local, k_global = model.forward_views(views, local)
        loss = multiview_loss(q_global, q_local, k_global, 0, 0.2, "pairs-sum")
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_momentum_encoder(0.9)
    assert torch.equal(backbone.encoder.pos_embedding, pos)

    # The 16 px forward: torchvision's blocks on 1 + 2 x 2 tokens, the embedding resampled bicubically.
    model.eval()
    x = local[:B]
    tokens = backbone.conv_proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.class_token.expand(B, -1, -1), tokens], dim=1)
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 4, -1)
    tokens = tokens + torch.cat([pos[:, :1], small], dim=1)
    expected = backbone.encoder.ln(backbone.encoder.layers(tokens))[:, 0]
    with torch.no_grad():
        assert torch.allclose(backbone(x), expected, atol=1e-5)


def test_position_embedding_resampling_keeps_the_native_grid_and_the_cls_row():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embedding(pos, 4) is pos
    small = resample_pos_embedding(pos, 2)
    assert small.shape == (1, 5, 8) and torch.equal(small[:, 0], pos[:, 0])
    # a constant grid stays constant (bicubic weights sum to 1)
    flat = torch.cat([torch.zeros(1, 1, 8), torch.ones(1, 16, 8)], dim=1)
    assert torch.allclose(resample_pos_embedding(flat, 3)[:, 1:], torch.ones(1, 9, 8), atol=1e-6)


def test_vit_refuses_inputs_that_are_not_whole_patches():
    torch.manual_seed(0)
    model = MoCo(**VIT).train()
    with pytest.raises(ValueError, match="multiple of 8 px, got 12 x 12"):
        model.base_encoder.backbone(torch.randn(2, 3, 12, 12))


# --- the views ------------------------------------------------------------------------------------

def test_local_crop_size_defaults():
    """DINO's 96 px of 224, scaled: the sizes docs/multicrop.md and --help name."""
    assert [local_crop_size(s) for s in (16, 32, 64, 224)] == [7, 14, 27, 96]
    assert local_crop_size(32, 4) == 12 and local_crop_size(32, 8) == 16
    assert local_crop_size(64, 8) == 24 and local_crop_size(224, 16) == 96 and local_crop_size(16, 8) == 8


def test_two_global_views_are_batchedtwoviews_draw_for_draw():
    sizes = torch.tensor([[40, 30], [32, 32], [20, 50]])
    two = BatchedTwoViews(image_size=16, crop_min=0.2, source_size=32)
    multi = BatchedMultiViews(image_size=16, crop_min=0.2, global_views=2, source_size=32)
    a, b = two.draw(sizes, torch.Generator().manual_seed(0)), multi.draw(sizes, torch.Generator().manual_seed(0))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    (v1, v2), (g, local) = two(images, a), multi(images, b)
    assert local is None and torch.equal(g[0], v1) and torch.equal(g[1], v2)


def test_global_and_local_views_shapes_recipes_and_crop_areas():
    n, views, crops = 64, 3, 4
    augment = BatchedMultiViews(image_size=16, crop_min=0.2, global_views=views, local_crops=crops, local_size=7,
                                source_size=32)
    sizes = torch.tensor([[32, 32]]).expand(n, 2)
    p = augment.draw(sizes, torch.Generator().manual_seed(0))
    assert all(v.shape[:2] == (n, views + crops) for v in p.values())
    assert not p["solarize"][:, 0].any() and p["blur"][:, 0].all()  # recipe A, B, A
    assert p["blur"][:, 2].all() and not p["solarize"][:, 2].any()
    assert not p["solarize"][:, views:].any()  # DINO's local recipe: no solarization, blur p 0.5
    assert 0.2 < p["blur"][:, views:].float().mean() < 0.8
    box = p["box"]
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1]) / 32 ** 2
    assert (area[:, :views] > 0.15).all()  # global crops from 20 % up (rounding to whole pixels aside)
    assert (area[:, views:] < LOCAL_SCALE[1] + 0.05).all() and (area[:, views:] > 0.02).all()
    images = (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    g, local = augment(images, p)
    assert len(g) == views and all(v.shape == (n, 3, 16, 16) for v in g)
    assert local.shape == (crops * n, 3, 7, 7) and torch.isfinite(local).all()


def namespace(**kwargs):
    values = dict(global_views=2, local_crops=2, local_crop_size=14, local_crop_scale=[0.05, 0.4], augment="batched",
                  image_size=32, arch="resnet18", stem="imagenet", patch_size=16, bf_views=PER_VIEW)
    return argparse.Namespace(**{**values, **kwargs})


@pytest.mark.parametrize("change,message", [
    (dict(local_crop_size=32), "--local-crop-size 32 is not smaller than --image-size 32"),
    (dict(augment="pil"), "add --augment batched"),
    (dict(local_crops=0, global_views=3, augment="pil"), "add --augment batched"),
    (dict(local_crop_scale=[0.4, 0.05]), "--local-crop-scale 0.4 0.05: the first"),
    (dict(arch="vit_tiny", patch_size=8, local_crop_size=14),
     "--local-crop-size 14 is not a multiple of --patch-size 8; use 16"),
])
def test_multicrop_flags_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        train.validate_views(namespace(**change))


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_layer4_input_side_is_torchvisions(stem):
    backbone = build_backbone("resnet18", stem).eval()
    seen = []
    backbone.layer4.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    sizes = (7, 14, 16, 17, 24, 32)
    with torch.no_grad():
        for size in sizes:
            backbone(torch.zeros(1, 3, size, size))
    assert seen == [layer4_input_side(size, stem) for size in sizes]
    if stem == "imagenet":
        assert [layer4_input_side(s, stem) for s in (14, 16, 17, 24)] == [1, 1, 2, 2]


def test_local_crops_that_give_layer4_a_1x1_map_are_refused_in_cpu_bf16():
    """DINO's 14 px at 32 px with the ImageNet stem: layer4 sees 1 x 1, where CPU bf16 convolutions
    return NaN weight gradients (docs/recipes.md#small-images); fine in fp32, on GPUs, with the small stem."""
    with pytest.raises(ConfigError, match="--local-crop-size 14 gives resnet18's layer4 a 1x1 map.*use "
                                          "--local-crop-size 17 or more"):
        train.check_local_crop_precision(namespace(), "bf16", "cpu")
    for config, precision, device in ((namespace(), "no", "cpu"), (namespace(), "bf16", "cuda"),
                                      (namespace(stem="small"), "bf16", "cpu"),
                                      (namespace(local_crop_size=17), "bf16", "cpu"),
                                      (namespace(local_crops=0, local_crop_size=None), "bf16", "cpu")):
        train.check_local_crop_precision(config, precision, device)


def test_local_crop_size_is_filled_only_with_local_crops():
    config, _ = train.with_recipe(train.parse_args(["--data", "x", "--image-size", "32", "--local-crops", "2"]))
    assert config.local_crop_size == 14
    config, _ = train.with_recipe(train.parse_args(["--data", "x", "-a", "vit_tiny", "--patch-size", "8",
                                                    "--image-size", "32", "--local-crops", "2"]))
    assert config.local_crop_size == 16
    config, _ = train.with_recipe(train.parse_args(["--data", "x"]))
    assert config.local_crop_size is None and not train.multicrop(config)  # the old path
    for name, value in train.ADDED_SINCE_0_1.items():  # a checkpoint from before records the defaults
        if name in ("global_views", "local_crops", "local_crop_size", "local_crop_scale", "bf_views"):
            assert getattr(config, name) == value, name


# --- whole runs -----------------------------------------------------------------------------------

MULTICROP = ["--augment", "batched", "--global-views", "3", "--local-crops", "2"]


@pytest.mark.slow
@pytest.mark.e2e  # about 35 s each: in make test-e2e, to keep make test near 8 minutes
def test_defaults_give_the_losses_and_weights_of_the_code_before_multicrop(tiny_data, straight_run, tmp_path):
    """The tiny run (scripts.TINY, BatchFormer on) of the last commit before multi-crop, on this
    machine, against this code's run with the new flags at their defaults: bit for bit."""
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", BASE_COMMIT], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"commit {BASE_COMMIT} is not in this checkout (a shallow clone?)")
    base = tmp_path / "base"
    base.mkdir()
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    before = subprocess.run(train_cmd(tiny_data, tmp_path / "before")[:1] + [str(base / "train.py")]
                            + train_cmd(tiny_data, tmp_path / "before")[2:], cwd=base, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(base)})
    assert before.returncode == 0, before.stdout + before.stderr
    now = run(train_cmd(tiny_data, tmp_path / "now", "--local-crops", "0", "--global-views", "2", "--bf-views",
                        "per-view"))
    assert now.returncode == 0, now.stdout + now.stderr
    expected = [(r["step"], r["loss"]) for r in metrics(tmp_path / "before")]
    assert len(expected) == STEPS
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path / "now")] == expected
    assert [(r["step"], r["loss"]) for r in metrics(straight_run)] == expected
    assert_same_weights(final_weights(tmp_path / "now"), final_weights(tmp_path / "before"))


@pytest.mark.slow
@pytest.mark.e2e  # about 35 s each: in make test-e2e, to keep make test near 8 minutes
def test_resume_mid_run_with_local_crops_is_bit_exact(tiny_data, tmp_path):
    """3 global views and 2 local crops, BatchFormer per view: stopped after step 3 and resumed,
    the run ends with the uninterrupted run's losses and weights."""
    straight = run(train_cmd(tiny_data, tmp_path / "straight", *MULTICROP))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "3 global at 16 px + 2 local at 7 px (area 0.05-0.4); BatchFormer per-view" in straight.stdout
    first = run(train_cmd(tiny_data, tmp_path / "resumed", *MULTICROP, "--max-steps", "3"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = run(train_cmd(tiny_data, tmp_path / "resumed", *MULTICROP))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(step 3)" in second.stdout
    losses = [(r["step"], r["loss"]) for r in metrics(tmp_path / "straight")]
    assert len(losses) == STEPS and all(math.isfinite(loss) for _, loss in losses)
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path / "resumed")] == losses
    assert_same_weights(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))
    # the views are part of the run's identity
    shutil.rmtree(tmp_path / "straight" / "checkpoints" / "step-00000008")
    changed = run(train_cmd(tiny_data, tmp_path / "straight", "--augment", "batched", "--global-views", "3",
                            "--local-crops", "4"))
    assert changed.returncode == 1 and "--local-crops 2 -> 4" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.slow
def test_vit_run_with_local_crops_and_joint_batchformer(tiny_data, tmp_path):
    """ViT-Tiny/8 at 16 px with 8 px local crops (one patch) and one BatchFormer sequence over all views."""
    result = run(train_cmd(tiny_data, tmp_path, "--augment", "batched", "--local-crops", "2", "--bf-views", "joint",
                           "--max-steps", "3", settings=VIT_TINY))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 global at 16 px + 2 local at 8 px" in result.stdout and "BatchFormer joint" in result.stdout
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path))
    assert TINY  # the ResNet runs above use scripts.TINY
