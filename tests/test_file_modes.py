"""Every file bfcl writes follows the umask, exports and checkpoints included (docs/reliability.md)."""

import os
import stat

import pytest
import torch

from bfcl.checkpoint import save_checkpoint
from bfcl.export import export_backbone
from bfcl.index import index_folder
from bfcl.progress import ProgressLog
from bfcl.synthetic import make_image_folder


def _written_files(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(folder, name), root): stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode)
            for folder, _, names in os.walk(root) for name in names}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, mask):
    data = make_image_folder(str(tmp_path / "data"), classes=2, train_per_class=2, val_per_class=1, size=8)
    out = tmp_path / "out"
    state = {"base_encoder.backbone.conv1.weight": torch.zeros(4, 3, 3, 3), "predictor.0.weight": torch.ones(2, 2)}
    old = os.umask(mask)
    try:
        save_checkpoint(str(out), 4, state, {"predictor.0.weight.momentum_buffer": torch.zeros(2, 2)},
                        {"config": {}}, keep=0)
        export_backbone(state, str(out / "backbone.safetensors"), arch="resnet18", stem="small", image_size=8, step=4)
        index_folder(data).save(str(out / "image-index.safetensors"))
        log = ProgressLog(str(out / "metrics.jsonl"), total_steps=4, start_step=0, bar=False)
        log.log(1, {"loss": 1.0})
        log.close()
    finally:
        os.umask(old)
    modes = _written_files(out)
    step = "checkpoints/step-00000004/"
    assert set(modes) == {step + "model.safetensors", step + "optimizer.safetensors", step + "meta.json",
                          "backbone.safetensors", "image-index.safetensors", "metrics.jsonl"}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
