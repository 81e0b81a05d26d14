"""bfcl: MoCo v3 self-supervised pretraining with BatchFormer, on Accelerate.

The package holds the method (model, loss, optimizer, schedules), the data, the evaluations and the
run plumbing the two scripts share; `train.py` and `probe.py` parse flags and call it. A notebook
calls it directly (bfcl/api.py):

    import bfcl
    backbone = bfcl.load_backbone("runs/toy")
    data = bfcl.labelled_data("data/toy", backbone=backbone)
    bfcl.knn(backbone, data), bfcl.fast_linear(backbone, data)

Errors are bfcl.errors.BfclError with a one-line message; nothing here exits.
"""

__version__ = "0.1.0"

# Imported here, after __version__ (bfcl.runs reads it), so that bfcl.knn and bfcl.finetune are these
# functions and not the submodules of the same names (import those as `from bfcl.knn import ...`).
from bfcl.api import (fast_linear, features, finetune, knn, labelled_data, linear_probe,  # noqa: E402
                      load_backbone)

__all__ = ["__version__", "load_backbone", "labelled_data", "features", "knn", "fast_linear", "linear_probe",
           "finetune"]
