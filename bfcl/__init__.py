"""bfcl: MoCo v3 self-supervised pretraining with BatchFormer, on Accelerate.

The package holds the method (model, loss, optimizer, schedules), the data, the evaluations and the
run plumbing the two scripts share; `train.py` and `probe.py` parse flags and call it. A notebook
calls it directly (bfcl/api.py):

    import bfcl
    backbone = bfcl.load_backbone("runs/toy")
    data = bfcl.labelled_data("data/toy", backbone=backbone)
    bfcl.knn_accuracy(backbone, data), bfcl.fast_linear(backbone, data)

Errors are bfcl.errors.BfclError with a one-line message; nothing here exits.
"""

__version__ = "0.1.0"

# The notebook surface of bfcl/api.py, imported on first use: `import bfcl` stays cheap, and
# `python -m bfcl.export` does not find its own module imported before it runs.
__all__ = ["__version__", "load_backbone", "labelled_data", "features", "knn_accuracy", "fast_linear",
           "linear_probe", "fine_tune"]


def __getattr__(name: str):
    if name in __all__:
        from bfcl import api
        return getattr(api, name)
    raise AttributeError(f"module 'bfcl' has no attribute {name!r}")
