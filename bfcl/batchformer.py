"""BatchFormer: a transformer layer that attends across the samples of a batch.

Hou et al., "BatchFormer: Learning to Explore Sample Relationships for Robust Representation
Learning", CVPR 2022. In the contrastive setting it sits between the backbone's pooled feature
and the projector, in both encoders (see bfcl/model.py).
"""

import torch
from torch import nn


class BatchFormer(nn.Module):
    """One post-norm transformer encoder layer over the local batch, seen as ONE sequence.

    d_model = feature width, 4 heads, feed-forward width = d_model, dropout 0.5, ReLU, no
    positional encoding, no mask: the released configuration.

    train: x [N, C] -> [2N, C] = [x ; BF(x)], plain rows first.
    eval:  x [N, C] -> x [N, C] (identity; BatchFormer is never used after pre-training).

    The layer is built with batch_first=True and fed [1, N, C]. Feeding [N, 1, C] instead (the
    most common reimplementation bug) makes every sample a sequence of length 1, and attention
    degenerates into a per-sample MLP; tests/test_batchformer.py catches that.
    """

    def __init__(self, dim: int, num_heads: int = 4, dropout: float = 0.5):
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=num_heads,
            dim_feedforward=dim,
            dropout=dropout,
            activation="relu",
            batch_first=True,
            norm_first=False,
        )

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        """context None: the sequence is the local batch (as released). Otherwise a callable
        x [N, C] -> (x_all [M, C], start) that gathers every process's rows WITH gradients (global
        context, train.py --bf-context global); this process's rows are x_all[start:start + N]."""
        if not self.training:
            return x
        rows, start = (x, 0) if context is None else context(x)
        if rows.shape[0] < 2:
            raise ValueError(
                f"BatchFormer needs at least 2 samples in its context, got {rows.shape[0]}; "
                "raise the per-process batch size"
            )
        mixed = self.encoder_layer(rows.unsqueeze(0)).squeeze(0)  # [1, M, C]: one sequence of M
        return torch.cat([x, mixed[start:start + x.shape[0]]], dim=0)


def dropout_seed(seed: int, step: int, process: int) -> int:
    """The torch seed set before each step's forward, so that BatchFormer's dropout masks are a
    function of (run seed, step, process index): a resumed run draws the same masks."""
    return seed * 1_000_003 + step * 1009 + process
