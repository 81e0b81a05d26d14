"""A run never writes non-finite weights: a NaN that appears after the last loss check (here: put
into a weight by the last step's momentum update, after its forward) stops the save with one line,
keeps the previous checkpoint and export as they were, and leaves nothing half-written."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from bfcl.checkpoint import load_checkpoint
from bfcl.errors import TrainingError
from bfcl.model import MoCo
from bfcl.runs import check_finite_weights
from scripts import STEPS, TINY, checkpoint_steps, error_of

POISONED = "base_encoder.backbone.layer4.0.conv1.weight"


def test_nan_before_the_last_save_is_refused_and_the_previous_checkpoint_kept(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    update = MoCo.update_momentum_encoder
    calls = []

    def update_then_poison(self, m):  # the last step: after its forward (loss finite), before its save
        update(self, m)
        calls.append(m)
        if len(calls) == STEPS:
            with torch.no_grad():
                self.get_parameter(POISONED)[0, 0, 0, 0] = float("nan")

    monkeypatch.setattr(MoCo, "update_momentum_encoder", update_then_poison)
    message = error_of(train.main, ["--data", tiny_data, "--output-dir", str(out), *TINY])

    lr = train.learning_rate(STEPS - 1, STEPS, 4, 0.6 * 8 / 256)  # TINY: 8 steps, 4 of warm-up, lr 0.6, batch 8
    kept = os.path.join(str(out), "checkpoints", "step-00000004")
    assert message == (f"error: the weights became non-finite by step {STEPS} ({POISONED}; lr {lr:.4g}, precision no); "
                       f"the last good checkpoint is kept in {kept}; lower --lr, or use fp32 with --mixed-precision no")
    # Only step 4's checkpoint, complete (read_meta checks sizes and SHA-256 of its files), no temporaries.
    assert checkpoint_steps(out) == [4]
    assert os.listdir(out / "checkpoints") == ["step-00000004"]
    model_state, _, meta = load_checkpoint(kept)
    assert meta["step"] == 4 and all(torch.isfinite(t).all() for t in model_state.values() if t.is_floating_point())
    # The export is still step 4's: the same tensors as that checkpoint's base backbone, all finite.
    export = str(out / "backbone.safetensors")
    with safe_open(export, "pt") as f:
        assert f.metadata()["step"] == "4"
    backbone = load_file(export)
    assert backbone.keys() == {k[len("base_encoder.backbone."):] for k in model_state
                               if k.startswith("base_encoder.backbone.")}
    for key, tensor in backbone.items():
        assert torch.equal(tensor, model_state["base_encoder.backbone." + key]), key
    assert not [name for name in os.listdir(out) if name.startswith(".") or ".tmp" in name]


class OneProcess:
    """What check_finite_weights asks of an Accelerator, on one CPU process."""

    device, mixed_precision = torch.device("cpu"), "bf16"

    def reduce(self, tensor, reduction):
        return tensor


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_weights_names_the_tensor(tmp_path, bad):
    state = {"a.weight": torch.ones(3), "a.num_batches_tracked": torch.tensor(7), "b.weight": torch.ones(2, 2)}
    check_finite_weights(state, OneProcess(), 5, 0.1, str(tmp_path))  # finite, integer buffers skipped: no error
    state["b.weight"][1, 0] = bad
    with pytest.raises(TrainingError) as e:
        check_finite_weights(state, OneProcess(), 5, 0.1, str(tmp_path))
    assert str(e.value) == ("the weights became non-finite by step 5 (b.weight; lr 0.1, precision bf16); no checkpoint "
                            f"was written in {tmp_path}; lower --lr, or use fp32 with --mixed-precision no")


def test_fine_tuning_refuses_a_nan_before_a_save(tmp_path, monkeypatch):
    """probe.py --mode finetune, 8 steps, a checkpoint every 2: a NaN put into the classifier after step 6's
    optimizer step stops the step-6 save (no evaluation there: by default this run evaluates at its end
    only, which would refuse the NaN scores first); step 4's checkpoint stays and no classifier is exported."""
    import bfcl.finetune
    import probe
    from bfcl.loop import Window
    from bfcl.synthetic import make_image_folder

    data = make_image_folder(str(tmp_path / "data"), classes=4, train_per_class=16, val_per_class=8, size=16)
    models, calls = [], []
    build, add = bfcl.finetune.finetune_model, Window.add
    monkeypatch.setattr(bfcl.finetune, "finetune_model", lambda *a, **k: models.append(build(*a, **k)) or models[-1])

    def add_then_poison(self, *args):  # Window.add follows the optimizer step
        add(self, *args)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                models[0].get_parameter("fc.weight")[0, 0] = float("nan")

    monkeypatch.setattr(Window, "add", add_then_poison)
    out = tmp_path / "finetune"
    message = error_of(probe.main, ["--random-init", "-a", "resnet18", "--stem", "small", "--image-size", "16",
                                    "--data", data, "--output-dir", str(out), "--mode", "finetune", "-b", "16",
                                    "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--save-every", "2"])
    kept = os.path.join(str(out), "checkpoints", "step-00000004")
    assert message.startswith("error: the weights became non-finite by step 6 (fc.weight; lr ")
    assert message.endswith(f", precision no); the last good checkpoint is kept in {kept}; lower --lr, or use fp32 "
                            "with --mixed-precision no")
    assert checkpoint_steps(out)[-1] == 4 and load_checkpoint(kept)[2]["step"] == 4
    assert not os.path.exists(out / "finetuned.safetensors")
    assert not [name for name in os.listdir(out / "checkpoints") if name.startswith(".")]
