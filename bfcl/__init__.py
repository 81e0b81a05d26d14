"""bfcl: MoCo v3 self-supervised pretraining with BatchFormer, on Accelerate.

The package holds the method (model, loss, optimizer, schedules) and the plumbing the two
scripts share (data, checkpoints, kNN). It knows nothing about launching: no ranks, no
process groups, no device placement. `train.py` and `probe.py` do that.
"""

__version__ = "0.1.0"
