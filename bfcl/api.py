"""What `import bfcl` offers a notebook: a backbone, labelled data, features, kNN, fast-linear,
the linear protocol and fine-tuning, each a function that takes named settings and returns data.

    import bfcl
    backbone = bfcl.load_backbone("runs/toy")               # or None / "random": a random init
    data = bfcl.labelled_data("data/toy", backbone=backbone)  # DIR/train/<class>/, DIR/val/<class>/
    bfcl.knn_accuracy(backbone, data)                       # {"temperature": 0.07, "k20": {...}, ...}

Every function takes an optional `accelerator` (None: the launcher's, or the CPU / one GPU of a
plain Python process) and gives the results on the main process (None on the others, where a
result needs one process's computation). Bad input raises a bfcl.errors.BfclError whose message
is one line. probe.py is these same functions behind flags; results match its results.json.

Long tails (docs/longtail.md): labelled_data(..., imbalance=100) trains on the CIFAR-LT subset;
fast_linear, linear_probe and fine_tune take loss="balanced-softmax"; every result holds its
"longtail" block (per-class and many / medium / few top-1).
"""

from accelerate import Accelerator

from bfcl import linear
from bfcl.evaluation import Backbone, ProbeData, labelled_data, load_backbone
from bfcl.finetune import FinetuneRun, finetune_recipe
from bfcl.finetune import finetune as finetune_loop
from bfcl.longtail import check_loss
from bfcl.runs import check_output_dir, make_accelerator, run_lock

__all__ = ["load_backbone", "labelled_data", "features", "knn_accuracy", "fast_linear", "linear_probe", "fine_tune"]


def _or_default(accelerator: Accelerator | None) -> Accelerator:
    return accelerator if accelerator is not None else make_accelerator()[0]


def features(backbone: Backbone, dataset, batch_size: int = 256, workers: int = 0,
             accelerator: Accelerator | None = None, max_bad_image_share: float = 0.01):
    """(x [M, C] float32, y [M] labels) on the CPU: the backbone's pooled feature (ResNet) or cls
    token (ViT) of every item of `dataset` (e.g. data.val, data.train: centre crops), in order.
    batch_size is global, over all processes."""
    accelerator = _or_default(accelerator)
    image_size = dataset[0][0].shape[-1]  # the crop side the dataset's transform makes
    model = linear.feature_model(backbone, 1, image_size, accelerator)
    return linear.features(model, dataset, batch_size // accelerator.num_processes, accelerator, workers,
                           max_bad_image_share)


def knn_accuracy(backbone: Backbone, data: ProbeData, ks=(20, 200), temperature: float = 0.07, batch_size: int = 256,
        workers: int = 0, accelerator: Accelerator | None = None) -> dict | None:
    """Weighted kNN (docs/method.md#knn) of data.val against data.train's features: results.json's
    "knn", {"temperature": T, "k20": {"top1": %, "top5": %}, ...}."""
    results = linear.quick_checks(backbone, data, _or_default(accelerator), knn_ks=list(ks), knn_t=temperature,
                                  fast_epochs=None, batch_size=batch_size, workers=workers)
    return results.get("knn")


def fast_linear(backbone: Backbone, data: ProbeData, epochs: int = 100, seed: int = 0, batch_size: int = 256,
                workers: int = 0, accelerator: Accelerator | None = None, loss: str = "ce") -> dict | None:
    """A linear head on cached centre-crop features (a quick check, not the protocol): results.json's
    "fast_linear", {"protocol": False, "epochs": E, "top1": %, "top5": %, ...}. loss: "ce" or
    "balanced-softmax"."""
    results = linear.quick_checks(backbone, data, _or_default(accelerator), knn_ks=None, fast_epochs=epochs,
                                  seed=seed, batch_size=batch_size, workers=workers, loss=loss)
    return results.get("fast_linear")


def linear_probe(backbone: Backbone, data: ProbeData, epochs: int | None = None, batch_size: int = 1024,
                 lr: float | None = None, bn_head: bool = False, bf_head: bool = False, seed: int = 0,
                 workers: int = 0, accelerator: Accelerator | None = None, loss: str = "ce") -> dict:
    """MoCo v3's linear protocol (docs/method.md#linear-protocol): results.json's "linear", with
    best/last/history. epochs None: 90; lr: base lr x batch_size / 256 (None: 0.1 ResNets, 3 ViTs);
    loss: "ce" or "balanced-softmax"."""
    return linear.linear_probe(backbone, data, _or_default(accelerator), epochs=epochs, batch_size=batch_size, lr=lr,
                               bn_head=bn_head, bf_head=bf_head, seed=seed, workers=workers, loss=loss)


def fine_tune(backbone: Backbone, data: ProbeData, output_dir: str, epochs: float | None = None,
             lr: float | None = None, batch_size: int = 256, seed: int = 0, bf_head: bool = False, workers: int = 0,
             resume: str = "auto", max_steps: int = 0, log_every: int = 10, accelerator: Accelerator | None = None,
             loss: str = "ce", **recipe) -> dict | int:
    """End-to-end fine-tuning (docs/method.md#fine-tuning) with the recipe of the backbone's family
    (pretrained or random init); epochs, lr (base, scaled by batch_size as the recipe says) and any
    other FinetuneRecipe field in `recipe` override it. Checkpoints, metrics.jsonl and
    finetuned.safetensors go to output_dir, from which a second call resumes ('auto'). loss: "ce" or
    "balanced-softmax" (Balanced Softmax, bfcl/longtail.py).
    Returns results.json's "finetune" (best/last/history), or bfcl.runs.EXIT_PREEMPTED when a stop
    signal (SIGINT, SIGTERM) came: a checkpoint was written, call again to resume."""
    accelerator = _or_default(accelerator)
    pretrained = backbone.info.get("source") != "random init"
    chosen, _ = finetune_recipe(backbone.arch, pretrained, epochs=epochs, base_lr=lr, **recipe)
    check_output_dir(output_dir)
    run = FinetuneRun(output_dir, batch_size, pretrained=pretrained, bf_head=bf_head, seed=seed, workers=workers,
                      resume=resume, max_steps=max_steps, log_every=log_every, loss=check_loss(loss))
    with run_lock(output_dir, accelerator):
        return finetune_loop(backbone, data, chosen, run, accelerator)
