"""Nearest neighbours and near-duplicate groups of an embedding matrix, and their files.

neighbours() is exact brute force: every row against every other, by cosine similarity, in
blocks of rows so that memory grows with block x N, never N². One block is a [block, D] x [D, N]
matmul (~2·N²·D FLOP in all) and a top-k over its [block, N] scores.

    indices, scores = neighbours(x, 10)                 # [N, 10] int64, [N, 10] float32
    groups = duplicate_groups(indices, scores, 0.95)    # [[3, 17, 902], [5, 6], ...]

Measured (bench/embed_bench.py --only neighbours --sizes 10000; 2 shared AMD EPYC cores with
AVX512-BF16, torch 2.14, 2026-12-08): N 10k x 512, K 10 in 0.83 s (fp32) and 0.65 s (bf16
matmul, the same neighbours), 243 / 328 MB above the rows. The time grows as N² (the matmul).
"""

import csv
import os
import time

import torch
import torch.nn.functional as F

from bfcl.checkpoint import save_file_atomic
from bfcl.paths import atomic_open

# neighbours.csv has N·K lines; above this a spreadsheet (Excel stops at 1,048,576 rows) cannot
# open it and nobody reads it, so only neighbours.safetensors is written.
CSV_MAX_ROWS = 1_000_000


# --duplicates without a value: the lowest cosine of the sweep in docs/results.md (make bench-embed) whose
# precision on planted CIFAR-10 duplicates is >= 0.99, with a 15-minute MoCo v3 backbone (0.996 there).
DUPLICATE_THRESHOLD = 0.99


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


CHUNK = 64  # columns per chunk in _candidates


def _candidates(s: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The q largest scores of each row of s [b, M] (M a multiple of CHUNK) and their columns,
    [b, q] each, in no set order among equal scores.

    A plain topk over 100k columns costs ~3 ns a score, as much as the matmul. The q largest
    scores lie in the q chunks of CHUNK columns with the largest maxima (a chunk holding one of
    them has a maximum at least as large), so a row's maxima per chunk (a fast reduction) pick q
    chunks, and topk runs over their q·CHUNK scores only.
    """
    b, m = s.shape
    if m <= 8 * CHUNK * q:
        return s.topk(q, dim=1)
    if s.dtype == torch.bfloat16:
        # bf16 reductions are slow on CPUs (~3 ns a score); int16 ones are not. The bits as int16
        # order scores >= 0 correctly and put every negative one below them, so the choice is
        # right wherever the q-th chunk's maximum is >= 0; other rows are redone in fp32.
        best, chunks = s.view(torch.int16).view(b, m // CHUNK, CHUNK).amax(dim=2).topk(q, dim=1)
        redo = (best[:, -1] < 0).nonzero().flatten()
        if len(redo):
            chunks[redo] = s[redo].float().view(len(redo), m // CHUNK, CHUNK).amax(dim=2).topk(q, dim=1).indices
    else:
        chunks = s.view(b, m // CHUNK, CHUNK).amax(dim=2).topk(q, dim=1).indices  # [b, q]
    cols = (chunks[:, :, None] * CHUNK + torch.arange(CHUNK, device=s.device)).reshape(b, -1)  # [b, q·CHUNK]
    top, where = s.gather(1, cols).topk(q, dim=1)
    return top, cols.gather(1, where)


def _block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) [b, k] of the top k of each row of s [b, M], ties broken by lower index.

    topk picks among equal scores in no set order, so k + 1 are taken: where the (k+1)-th score
    is below the k-th, every score tied with the k-th is inside and sorting is enough. (Selecting
    k + 1 chunks in _candidates keeps that true: the chunks left out all lie below the k-th.)
    Rows with a tie across the cut (rare outside planted data) are redone from the whole row:
    every score above the k-th, then the lowest columns equal to it.
    """
    top, idx = _candidates(s, k + 1)
    top, idx = _ranked(top, idx)
    scores, indices = top[:, :k].contiguous(), idx[:, :k].contiguous()
    for r in (top[:, k] == top[:, k - 1]).nonzero().flatten().tolist():
        row, kth = s[r], top[r, k - 1]
        above = (row > kth).nonzero().flatten()
        tied = (row == kth).nonzero().flatten()[:k - above.numel()]  # nonzero is in column order
        chosen = torch.cat([above, tied])
        scores[r], indices[r] = (t[0] for t in _ranked(row[chosen][None], chosen[None]))
    return scores, indices


def bf16_error_bound(width: int) -> float:
    """How far a bf16 matmul's score of two unit rows can be from the exact one: inputs rounded
    to 8 significant bits (relative 2^-9 each: 2^-8 on a product, at most 2^-8 summed over the
    row by Cauchy-Schwarz), the fp32 sum of `width` products (width·2^-24), the result rounded
    to bf16 (2^-9); with 25 % to spare. 0.0074 at width 512."""
    return 1.25 * (2 ** -8 + 2 ** -9 + width * 2 ** -24)


def _scores(xq: torch.Tensor, x: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """[b, M] scores of the query rows xq (rows first.. of x) against x [M, D] (zero rows past n),
    self-matches and padding at -inf."""
    s = xq @ x.T
    s[:, first:first + xq.shape[0]].diagonal().fill_(float("-inf"))
    s[:, n:] = float("-inf")
    return s


def _block_bf16(x: torch.Tensor, x16: torch.Tensor, start: int, stop: int, n: int, k: int,
                margin: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows start..stop-1 as in _block_topk, the matmul in bf16: (scores, indices, rows redone).

    bf16 picks k + margin candidates, which are rescored in float64. Every other column's
    bf16 score is at most the lowest candidate's, so its exact score is at most that plus
    bf16_error_bound; where the k-th exact score lies above that, no other column can enter the
    top k and the answer is exact. The rows where it does not are redone in fp32.
    """
    q = min(k + margin, n - 1)
    approx, cand = _candidates(_scores(x16[start:stop], x16, start, n), q)
    exact = torch.cat([torch.bmm(x[c].double(), x[start + i:start + i + len(c), :, None].double())[..., 0]
                       for i, c in zip(range(0, len(cand), 256), cand.split(256))])  # [b, q] float64
    exact, indices = (t[:, :k].contiguous() for t in _ranked(exact, cand))
    unsure = torch.zeros(stop - start, dtype=torch.bool, device=x.device) if q == n - 1 else \
        exact[:, k - 1] <= approx.double().amin(dim=1) + bf16_error_bound(x.shape[1])
    scores = exact.float()
    redo = unsure.nonzero().flatten()
    if len(redo):
        s = x[start + redo] @ x.T
        s[torch.arange(len(redo), device=x.device), start + redo] = float("-inf")
        s[:, n:] = float("-inf")
        scores[redo], indices[redo] = _block_topk(s, k)
    return scores, indices, len(redo)


@torch.no_grad()
def neighbours(x: torch.Tensor, k: int, *, block: int = 4096, device=None,
               matmul: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """For every row of x [N, D], its k most cosine-similar other rows: (indices [N, k] int64,
    scores [N, k] float32), best first, equal scores by lower index, never the row itself.

    Exact in fp32, on `device` (default: x's). matmul="bfloat16" does the matmul in bf16 (~4x
    faster on a CPU with native bf16, avx512_bf16 or AMX) and certifies each row's answer against
    the rounding bound, redoing in fp32 the rows it cannot certify: the same neighbours, up to
    scores within fp32 rounding (~1e-7) that fp32 may order the other way. Rows are L2-normalised
    here (a zero row scores 0 against everything).
    Peak memory beyond x: one [block, N] score block, 4·block·N bytes in fp32 (1.6 GB at block
    4096 and N 100k; 2·block·N in bf16), plus [block, k] results: set `block` to bound it.
    """
    n = x.shape[0]
    check_k(k, n)
    if matmul not in ("float32", "bfloat16"):
        raise ValueError(f"matmul {matmul!r} is not float32 or bfloat16")
    if not torch.isfinite(x).all():
        raise ValueError("the embeddings hold NaN or infinite values; embed again")
    x = F.normalize(x.to(device or x.device, torch.float32), dim=1)
    x = torch.cat([x, x.new_zeros(-n % CHUNK, x.shape[1])])  # whole chunks; the padding scores -inf
    x16 = x.bfloat16() if matmul == "bfloat16" else None
    all_scores, all_indices = torch.empty(n, k), torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block):
        stop = min(start + block, n)
        if x16 is None:
            scores, indices = _block_topk(_scores(x[start:stop], x, start, n), k)
        else:
            scores, indices, _ = _block_bf16(x, x16, start, stop, n, k, margin=k + 8)
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
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_neighbours(output_dir: str, indices: torch.Tensor, scores: torch.Tensor, paths: list[str],
                     metadata: dict | None = None) -> list[str]:
    """neighbours.safetensors (indices [N, K] int64, scores [N, K] float32; `metadata`, e.g. the
    embeddings' images_sha256, kept in it), and neighbours.csv (path, rank 1..K, neighbour path,
    score) when N·K <= CSV_MAX_ROWS, else any earlier neighbours.csv removed. The files written."""
    files, csv_file = [os.path.join(output_dir, "neighbours.safetensors")], os.path.join(output_dir, "neighbours.csv")
    if os.path.exists(csv_file):  # an earlier run's; never left beside other neighbours
        os.remove(csv_file)
    meta = {**(metadata or {}), "k": str(indices.shape[1]), "rows": str(indices.shape[0])}
    save_file_atomic({"indices": indices, "scores": scores}, files[0], meta)
    if indices.numel() <= CSV_MAX_ROWS:
        files.append(csv_file)
        ranked = ((paths[i], r + 1, paths[j], f"{s:.6f}") for i, (row, row_scores) in
                  enumerate(zip(indices.tolist(), scores.tolist())) for r, (j, s) in enumerate(zip(row, row_scores)))
        _atomic_csv(csv_file, ["path", "rank", "neighbour", "score"], ranked)
    return files


def write_duplicates(output_dir: str, groups: list[list[int]], group_scores: list[list[float]],
                     paths: list[str]) -> str:
    """duplicates.csv: group id (0 = the largest), path, cosine to the group's first image."""
    path = os.path.join(output_dir, "duplicates.csv")
    rows = ((g, paths[i], f"{s:.6f}") for g, (members, sc) in enumerate(zip(groups, group_scores))
            for i, s in zip(members, sc))
    _atomic_csv(path, ["group", "path", "score_to_first"], rows)
    return path


def search_and_write(output_dir: str, k: int, threshold: float | None, block: int, device) -> dict:
    """probe.py --neighbours / --duplicates on the embeddings in output_dir (bfcl.embed): writes their
    files; returns what they hold, their times and the peak of the score blocks. bf16 matmul on a CPU
    that computes it natively (exact: see neighbours)."""
    from bfcl.embed import load  # here, not above: the search itself needs none of the models bfcl.embed loads
    from bfcl.precision import cpu_has_native_bf16

    emb = load(output_dir)
    n = emb.matrix.shape[0]
    matmul = "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"
    started = time.time()
    idx, scores = neighbours(emb.matrix, k, block=block, device=device, matmul=matmul)
    out = {"neighbours": {"k": k, "matmul": matmul, "seconds": round(time.time() - started, 2),
                          "peak_block_bytes": 4 * min(block, n) * n}}
    files = write_neighbours(output_dir, idx, scores, emb.paths, {"images_sha256": emb.metadata["images_sha256"]})
    if threshold is not None:
        started = time.time()
        groups = duplicate_groups(idx, scores, threshold)
        files.append(write_duplicates(output_dir, groups, scores_to_first(emb.matrix, groups), emb.paths))
        out["duplicates"] = {"threshold": threshold, "groups": len(groups), "images": sum(map(len, groups)),
                             "seconds": round(time.time() - started, 2)}
    out["files"] = files
    return out
