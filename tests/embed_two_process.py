"""Embed DATA into OUT with a random-init resnet18/small seeded by SEED (default 0; 16 px, batch 4 a
process, shards of 12 images), on as many processes as torchrun starts: tests/test_embed.py compares
1 and 2 processes. An error is one line on stdout and exit status 2 on every process."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's bfcl

from accelerate import Accelerator  # noqa: E402

from bfcl.checkpoint import CheckpointError  # noqa: E402
from bfcl.embed import embed_images, embed_index  # noqa: E402
from bfcl.evaluation import load_backbone  # noqa: E402

data, out = sys.argv[1:3]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
accelerator = Accelerator(cpu=True)
backbone = load_backbone(None, arch="resnet18", stem="small", image_size=16, seed=seed)
if accelerator.is_main_process:
    embed_index(data, None, out)  # built once, by one process, as train.py does
accelerator.wait_for_everyone()
index, _ = embed_index(data, None, out)
try:
    result = embed_images(backbone, index, out, image_size=16, batch_size=4, shard_size=12, accelerator=accelerator)
except CheckpointError as e:
    print(f"error (process {accelerator.process_index}): {e}", flush=True)
    sys.exit(2)
accelerator.print(f"computed {result.shards_computed} shards, {result.rows} rows")
