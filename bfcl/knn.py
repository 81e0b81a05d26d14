"""Weighted k-nearest-neighbour classification on frozen features (Wu et al., 2018).

Each of the k nearest bank features votes for its label with weight exp(cos / T); the
standard self-supervised monitor (k = 20 or 200, T = 0.07).
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of every (image, label) batch: ([M, C] fp32 on CPU, [M] labels)."""
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_scores(features, bank, bank_labels, num_classes: int, k: int = 200,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [M, num_classes] for queries [M, C] against a bank [B, C] with labels [B].

    Features are L2-normalised here. Queries go in chunks to bound the [chunk, B] similarity.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        q = F.normalize(features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(q.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """{"top1": %, "top5": %} of scores [M, K] against labels [M]; k is capped at the class count."""
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
