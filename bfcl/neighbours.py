"""Nearest neighbours and near-duplicate groups of an embedding matrix, and their files.

neighbours() is exact brute force: every row against every other, by cosine similarity, in
blocks of rows so that memory grows with block x N, never N². One block is a [block, D] x [D, N]
matmul (~2·N²·D FLOP in all) and a top-k over its [block, N] scores.

    indices, scores = neighbours(x, 10)                 # [N, 10] int64, [N, 10] float32
    groups = duplicate_groups(indices, scores, 0.95)    # [[3, 17, 902], [5, 6], ...]
"""

import csv
import os

import torch
import torch.nn.functional as F

from bfcl.checkpoint import save_file_atomic

# neighbours.csv has N·K lines; above this a spreadsheet (Excel stops at 1,048,576 rows) cannot
# open it and nobody reads it, so only neighbours.safetensors is written.
CSV_MAX_ROWS = 1_000_000


def check_k(k: int, n: int) -> None:
    """ValueError in one line unless 1 <= k < n."""
    if not 1 <= k < n:
        raise ValueError(f"--neighbours {k} needs 1 <= K < N: there are {n} images, so each has {n - 1} others")


def check_threshold(threshold: float) -> None:
    """ValueError in one line unless 0 < threshold <= 1."""
    if not 0 < threshold <= 1:
        raise ValueError(f"--duplicates {threshold} is not a cosine similarity in (0, 1]; try 0.95")


def _ranked(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same candidates [b, k], ordered by score, highest first, equal scores by lower index."""
    by_index = indices.argsort(dim=1)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)  # stable: the lower index stays first
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) [b, k] of the top k of each row of s [b, N], ties broken by lower index.

    torch.topk picks among equal scores in no set order, so it takes k + 1: where the (k+1)-th
    score is below the k-th, every candidate tied with the k-th is inside and sorting is enough.
    Rows with a tie across the cut (rare outside planted data) are redone from the whole row:
    every score above the k-th, then the lowest indices equal to it.
    """
    top, idx = s.topk(k + 1, dim=1)
    scores, indices = _ranked(top[:, :k], idx[:, :k])
    for r in (top[:, k] == top[:, k - 1]).nonzero().flatten().tolist():
        row, kth = s[r], top[r, k - 1]
        above = (row > kth).nonzero().flatten()
        tied = (row == kth).nonzero().flatten()[:k - above.numel()]  # nonzero is in index order
        chosen = torch.cat([above, tied])
        scores[r], indices[r] = (t[0] for t in _ranked(row[chosen][None], chosen[None]))
    return scores, indices


@torch.no_grad()
def neighbours(x: torch.Tensor, k: int, *, block: int = 4096, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of x [N, D], its k most cosine-similar other rows: (indices [N, k] int64,
    scores [N, k] float32), best first, equal scores by lower index, never the row itself.

    Exact, in fp32 on `device` (default: x's). Peak memory beyond x: one [block, N] fp32 score
    block and its top-k, 4·block·N bytes (1.6 GB at block 4096, N 100k; lower `block` to bound it).
    Rows are L2-normalised here, so x need not be (a zero row scores 0 against everything).
    """
    n = x.shape[0]
    check_k(k, n)
    if not torch.isfinite(x).all():
        raise ValueError("the embeddings hold NaN or infinite values; embed again")
    x = F.normalize(x.to(device or x.device, torch.float32), dim=1)
    all_scores, all_indices = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block):
        stop = min(start + block, n)
        s = x[start:stop] @ x.T  # [b, N]
        s[:, start:stop].diagonal().fill_(float("-inf"))  # self-matches out
        scores, indices = _block_topk(s, k)
        all_scores[start:stop], all_indices[start:stop] = scores.cpu(), indices.cpu()
    return all_indices, all_scores


def duplicate_groups(indices: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[list[int]]:
    """Rows joined transitively where a neighbour's cosine >= threshold (union-find over the
    [N, K] lists of neighbours()): groups of 2 or more rows, each sorted, largest first (then by
    first row).

    The edges are the neighbour lists, so this equals the components of the whole threshold graph
    whenever no row has more than K others at >= threshold; a larger cluster still joins through
    chains of neighbours, and its members then miss edges only to others already in the group.
    """
    check_threshold(threshold)
    parent = list(range(indices.shape[0]))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    rows, cols = (scores >= threshold).nonzero(as_tuple=True)
    for i, j in zip(rows.tolist(), indices[rows, cols].tolist()):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in sorted(set(rows.tolist()) | set(indices[rows, cols].tolist())):
        members.setdefault(root(i), []).append(i)
    return sorted((g for g in members.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def scores_to_first(x: torch.Tensor, groups: list[list[int]]) -> list[list[float]]:
    """Cosine of each member of each group to the group's first row (1.0 for the first itself)."""
    out = []
    for g in groups:
        rows = F.normalize(x[g].float(), dim=1)
        out.append((rows @ rows[0]).tolist())
    return out


def _atomic_csv(path: str, header: list[str], rows) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_neighbours(output_dir: str, indices: torch.Tensor, scores: torch.Tensor, paths: list[str],
                     metadata: dict | None = None) -> list[str]:
    """neighbours.safetensors (indices [N, K] int64, scores [N, K] float32), and neighbours.csv
    (path, rank 1..K, neighbour path, score) when N·K <= CSV_MAX_ROWS. The files written."""
    files = [os.path.join(output_dir, "neighbours.safetensors")]
    meta = {**(metadata or {}), "k": str(indices.shape[1]), "rows": str(indices.shape[0])}
    save_file_atomic({"indices": indices, "scores": scores}, files[0], meta)
    if indices.numel() <= CSV_MAX_ROWS:
        files.append(os.path.join(output_dir, "neighbours.csv"))
        ranked = ((paths[i], r + 1, paths[j], f"{s:.6f}") for i, (row, row_scores) in
                  enumerate(zip(indices.tolist(), scores.tolist())) for r, (j, s) in enumerate(zip(row, row_scores)))
        _atomic_csv(files[1], ["path", "rank", "neighbour", "score"], ranked)
    return files


def write_duplicates(output_dir: str, groups: list[list[int]], group_scores: list[list[float]],
                     paths: list[str]) -> str:
    """duplicates.csv: group id (0 = the largest), path, cosine to the group's first image."""
    path = os.path.join(output_dir, "duplicates.csv")
    rows = ((g, paths[i], f"{s:.6f}") for g, (members, sc) in enumerate(zip(groups, group_scores))
            for i, s in zip(members, sc))
    _atomic_csv(path, ["group", "path", "score_to_first"], rows)
    return path
