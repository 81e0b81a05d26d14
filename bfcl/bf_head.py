"""BatchFormer in the classifier: probe.py --mode finetune|linear --bf-head 1.

Hou et al., "BatchFormer: Learning to Explore Sample Relationships for Robust Representation
Learning" (CVPR 2022), §3: in supervised recognition the module sits between the backbone's
feature and the classifier; the classifier is SHARED by the plain rows and the BatchFormer rows,
each BatchFormer row keeps its sample's label, and BatchFormer is dropped at test time, so the
deployed model is the plain classifier. The paper reports its gains on long-tailed and
data-scarce (few-shot, zero-shot) recognition. Unlike pretraining's frozen module
(bfcl/model.py), this one trains with the classifier. The layer itself is bfcl.batchformer's.
"""

import contextlib

import torch
from torch import nn

from bfcl.batchformer import BatchFormer
from bfcl.pretrained import head_name


class BatchFormerClassifier(nn.Module):
    """A torchvision classifier (ResNet head `fc`, ViT head `heads`) with BatchFormer before its head.

    train: images [N, 3, H, W] -> features x [N, C] -> [x ; BF(x)] [2N, C] -> logits [2N, K],
           plain rows first; the loss takes duplicate_targets(targets) (the labels twice).
    eval:  images [N, 3, H, W] -> logits [N, K] = head(x): BatchFormer is the identity.

    The classifier's head is moved to `self.head` and its own slot set to the identity, so
    `self.backbone` returns features. classifier_state() puts the head back under its
    torchvision name and leaves BatchFormer out: it loads strictly into torchvision's model.
    """

    def __init__(self, classifier: nn.Module, num_heads: int = 4, dropout: float = 0.5):
        super().__init__()
        self.head_name = head_name(classifier)
        self.head = getattr(classifier, self.head_name)
        setattr(classifier, self.head_name, nn.Identity())
        self.backbone = classifier
        self.feature_dim = classifier.feature_dim
        self.batchformer = BatchFormer(self.feature_dim, num_heads, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.batchformer(self.backbone(images)))

    @contextlib.contextmanager
    def plain_classifier(self):
        """The torchvision classifier with its head back in place, while the body runs: its own
        parameter names and order, which bfcl.optim.param_groups' ViT rules and checkpoints use."""
        setattr(self.backbone, self.head_name, self.head)
        try:
            yield self.backbone
        finally:
            setattr(self.backbone, self.head_name, nn.Identity())

    def classifier_state(self) -> dict:
        """The plain classifier's state dict, torchvision keys (fc.* / heads.head.*), no BatchFormer."""
        head = {f"{self.head_name}.{k}": v for k, v in self.head.state_dict().items()}
        return {**self.backbone.state_dict(), **head}


def duplicate_targets(targets: torch.Tensor) -> torch.Tensor:
    """Labels for [x ; BF(x)]: targets [N] (classes) or [N, K] (soft) -> [2N] or [2N, K]."""
    return torch.cat([targets, targets], dim=0)


def targets_for(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """targets as they are when logits has one row per sample, duplicated when it has two (BatchFormer)."""
    if logits.shape[0] == targets.shape[0]:
        return targets
    if logits.shape[0] == 2 * targets.shape[0]:
        return duplicate_targets(targets)
    raise ValueError(f"{logits.shape[0]} logit rows for {targets.shape[0]} targets: expected N or 2N")
