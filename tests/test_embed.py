"""bfcl.embed and bfcl.neighbours against references: a direct forward of the backbone, brute-force
neighbours, connected components of the whole threshold graph, an uninterrupted run, one process."""

import dataclasses
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import bfcl.embed
import bfcl.neighbours
from bfcl.checkpoint import CheckpointError
from bfcl.embed import embed_images, embed_index, load, most_similar
from bfcl.evaluation import load_backbone
from bfcl.errors import DataError
from bfcl.model import build_backbone
from bfcl.neighbours import (CHUNK, _candidates, bf16_error_bound, duplicate_groups, neighbours, scores_to_first,
                             write_duplicates, write_neighbours)
from bfcl.synthetic import make_image_folder, make_unlabelled_folder
from bfcl.views import eval_transform
from scripts import TORCHRUN, run

SIZE = 16


def random_backbone(seed: int = 0):
    return load_backbone(None, arch="resnet18", stem="small", image_size=SIZE, seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("embed-data")), classes=4, train_per_class=8,
                             val_per_class=8, size=SIZE)


def embed(data_dir, out, backbone=None, **kw):
    index, _ = embed_index(data_dir, None, str(out))
    kw = {"image_size": SIZE, "batch_size": 4, **kw}
    return index, embed_images(backbone or random_backbone(), index, str(out), **kw)


def reference_features(backbone, files) -> torch.Tensor:
    """[N, C]: the backbone built and loaded by hand, one forward over all images at once."""
    model = build_backbone("resnet18", "small", image_size=SIZE)
    model.fc = torch.nn.Identity()
    missing, unexpected = model.load_state_dict(backbone.state, strict=False)
    assert not missing and not unexpected
    images = torch.stack([eval_transform(SIZE)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model.eval()(images)


def test_rows_follow_the_index_and_equal_a_direct_forward(data, tmp_path):
    backbone = random_backbone()
    index, result = embed(data, tmp_path, backbone)
    emb = load(str(tmp_path))
    assert emb.paths == [index.paths[i] for i in range(len(index))] == open(tmp_path / "images.txt").read().split()
    assert emb.paths[0] == "class_0/00000.jpg" and result.rows == len(index) == 32
    assert emb.labels.tolist() == list(index.labels)
    reference = reference_features(backbone, [index.path(i) for i in range(len(index))])
    torch.testing.assert_close(emb.matrix, F.normalize(reference, dim=1), atol=1e-5, rtol=1e-4)
    assert emb.metadata["rows"] == "32" and emb.metadata["normalised"] == "yes"
    raw, _ = embed(data, tmp_path / "raw", backbone, normalise=False, dtype=torch.float16)
    emb16 = load(str(tmp_path / "raw"))
    assert emb16.matrix.dtype == torch.float16 and emb16.metadata["normalised"] == "no"
    torch.testing.assert_close(emb16.matrix.float(), reference, atol=2e-2, rtol=2e-3)


def test_a_nested_folder_and_a_list_file_keep_their_order_without_labels(tmp_path):
    photos = make_unlabelled_folder(str(tmp_path / "photos"), images=12, size=SIZE)
    embed(photos, tmp_path / "out-folder")
    emb = load(str(tmp_path / "out-folder"))
    index, _ = embed_index(photos, None, str(tmp_path / "out-folder"))
    assert index.layout == "folder" and emb.labels is None and emb.metadata["classes"] == "[]"
    assert emb.paths == [index.paths[i] for i in range(12)] and emb.paths[0] == "2020/01/IMG_00000.jpg"
    listed = list(reversed(emb.paths[:5]))
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    index, _ = embed_index(photos, str(tmp_path / "list.txt"), str(tmp_path / "out-list"))
    embed_images(random_backbone(), index, str(tmp_path / "out-list"), image_size=SIZE, batch_size=4)
    from_list = load(str(tmp_path / "out-list"))
    assert index.layout == "list" and from_list.paths == listed
    # row i: the same image, the same features (to rounding: its batch holds other images)
    torch.testing.assert_close(from_list.matrix, emb.matrix[[4, 3, 2, 1, 0]], atol=1e-6, rtol=1e-5)


def test_unreadable_images_get_no_row_and_are_listed(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "train" / "class_1" / "00003.jpg").write_bytes(b"not a jpeg")
    index, result = embed(str(copy), tmp_path / "out")
    emb = load(str(tmp_path / "out"))
    assert result.unreadable == ["class_1/00003.jpg"] and result.rows == 31
    assert emb.paths == [index.paths[i] for i in range(len(index)) if i != 11]
    assert emb.labels.tolist() == [index.labels[i] for i in range(len(index)) if i != 11]
    line = open(tmp_path / "out" / "unreadable.txt").read()
    assert line.startswith("class_1/00003.jpg\t") and line.count("\n") == 1
    assert emb.metadata["unreadable"] == "1"


def brute_force(x: torch.Tensor, k: int) -> tuple[list, list]:
    """Every pair's cosine in float64, each row's others sorted by (score descending, index)."""
    x = F.normalize(x.double(), dim=1)
    s = (x @ x.T).tolist()
    order = [sorted((j for j in range(len(s)) if j != i), key=lambda j: (-s[i][j], j))[:k] for i in range(len(s))]
    return order, [[s[i][j] for j in row] for i, row in enumerate(order)]


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_neighbours_equal_brute_force_with_ties(block):
    g = torch.Generator().manual_seed(0)
    # ±1 entries in 16 dims: every cosine is a multiple of 1/8, exact in fp32, so ties abound
    x = torch.randint(0, 2, (150, 16), generator=g).float() * 2 - 1
    x[10] = x[3]  # exact copies: ties at the top too
    x[11] = x[3] * 2  # the same direction, another length
    indices, scores = neighbours(x, 6, block=block)
    order, ref_scores = brute_force(x, 6)
    assert indices.tolist() == order
    torch.testing.assert_close(scores, torch.tensor(ref_scores, dtype=torch.float32))
    assert indices[3, :2].tolist() == [10, 11] and scores[3, 0] == 1
    assert not (indices == torch.arange(150)[:, None]).any()
    # the slow path (a tie across the cut) really ran: some row's 6th and 7th scores are equal
    assert any(ref_k == row[6] for row, ref_k in zip(brute_force(x, 7)[1], torch.tensor(ref_scores)[:, 5].tolist()))


def test_neighbours_of_random_vectors():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    indices, scores = neighbours(x, 10, block=128)
    order, ref_scores = brute_force(x, 10)
    assert indices.tolist() == order
    torch.testing.assert_close(scores, torch.tensor(ref_scores, dtype=torch.float32), atol=1e-6, rtol=0)


def reference_order(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force for larger N: float64 cosines, self at -inf, a stable sort (equal scores: lower index)."""
    x = F.normalize(x.double(), dim=1)
    s = x @ x.T
    s.fill_diagonal_(float("-inf"))
    scores, order = s.sort(dim=1, descending=True, stable=True)
    return order[:, :k], scores[:, :k].float()


@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["ties", "random"])
def test_neighbours_over_chunks_and_in_bf16_equal_brute_force(matmul, kind):
    """N 2100 > 8 x 64 x (k + 1): the chunked selection runs; ±1 rows tie everywhere and defeat
    the bf16 certificate (every row redone in fp32); random rows are certified."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2, (2100, 16), generator=g).float() * 2 - 1 if kind == "ties" else \
        torch.randn(2100, 48, generator=g)
    indices, scores = neighbours(x, 3, block=700, matmul=matmul)
    order, ref_scores = reference_order(x, 3)
    assert torch.equal(indices, order)
    torch.testing.assert_close(scores, ref_scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_candidates_are_the_largest_scores(dtype):
    """_candidates picks chunks by their maxima (bf16: by the bits as int16, rows whose pick could be
    wrong redone): its values must be each row's q largest, rows of mostly negative scores included."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, CHUNK * 200, generator=g)  # over 8 x CHUNK x q columns: the chunked path
    s[1] = -s[1].abs()  # all negative: the int16 order is reversed there
    s[2, :-3] = -s[2, :-3].abs()  # 3 positive scores, fewer than q
    s[3, 100:110] = 5.0  # ties at the top
    s = s.to(dtype)
    top, cols = _candidates(s, 12)
    assert torch.equal(s.gather(1, cols), top)
    assert torch.equal(top.sort(dim=1, descending=True).values, s.float().topk(12, dim=1).values.to(dtype))


def test_the_bf16_error_bound_holds():
    x = F.normalize(torch.randn(3000, 512, generator=torch.Generator().manual_seed(3)), dim=1)
    x[1] = x[0]  # a cosine of 1: the largest output rounding
    exact = x.double() @ x.double().T
    approx = (x.bfloat16() @ x.bfloat16().T).double()
    assert (approx - exact).abs().max() <= bf16_error_bound(512)


def planted(seed: int = 0) -> torch.Tensor:
    """[300, 64]: random directions, and groups of near-copies (noise 0.05) of some of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 64, generator=g)
    for first, size in ((5, 6), (40, 3), (100, 2), (200, 4), (250, 2)):
        x[first + 1:first + size] = x[first] + 0.05 * torch.randn(size - 1, 64, generator=g)
    return x


def components(x: torch.Tensor, threshold: float) -> list[list[int]]:
    """Connected components of 2+ rows of the whole graph cosine >= threshold, by depth-first search."""
    s = F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T
    seen, groups = set(), []
    for i in range(len(x)):
        if i in seen:
            continue
        stack, group = [i], []
        seen.add(i)
        while stack:
            a = stack.pop()
            group.append(a)
            for b in (s[a] >= threshold).nonzero().flatten().tolist():
                if b not in seen:
                    seen.add(b)
                    stack.append(b)
        if len(group) > 1:
            groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_duplicate_groups_equal_the_threshold_graph(tmp_path, monkeypatch):
    x = planted()
    indices, scores = neighbours(x, 8)
    for threshold in (0.99, 0.95, 0.9, 0.3):
        assert duplicate_groups(indices, scores, threshold) == components(x, threshold), threshold
    groups = duplicate_groups(indices, scores, 0.95)
    assert groups[0] == list(range(5, 11)) and [len(g) for g in groups] == [6, 4, 3, 2, 2]
    to_first = scores_to_first(x, groups)
    x64 = F.normalize(x.double(), dim=1)
    assert to_first[1] == pytest.approx([float(x64[i] @ x64[groups[1][0]]) for i in groups[1]], abs=1e-6)
    paths = [f"img{i}.jpg" for i in range(len(x))]
    write_duplicates(str(tmp_path), groups, to_first, paths)
    lines = open(tmp_path / "duplicates.csv").read().splitlines()
    assert lines[0] == "group,path,score_to_first" and lines[1] == "0,img5.jpg,1.000000" and len(lines) == 18
    files = write_neighbours(str(tmp_path), indices, scores, paths)
    assert [os.path.basename(f) for f in files] == ["neighbours.safetensors", "neighbours.csv"]
    with safe_open(files[0], framework="pt") as f:
        assert torch.equal(f.get_tensor("indices"), indices) and torch.equal(f.get_tensor("scores"), scores)
    rows = open(files[1]).read().splitlines()
    assert len(rows) == 1 + 300 * 8 and rows[1] == f"img0.jpg,1,img{indices[0, 0]}.jpg,{scores[0, 0]:.6f}"
    monkeypatch.setattr(bfcl.neighbours, "CSV_MAX_ROWS", 300 * 8 - 1)  # too many lines to read: no csv
    assert write_neighbours(str(tmp_path), indices, scores, paths) == files[:1] and not os.path.exists(files[1])


def test_an_interrupted_sharded_run_resumes_and_ends_identical(data, tmp_path, monkeypatch):
    told = []
    _, straight = embed(data, tmp_path / "straight", shard_size=8, progress=told.append)
    assert straight.shards_computed == 4 and told == [4] * 8
    save, computed = bfcl.embed.save_shard, []

    def save_once_then_die(file, part, want, start, stop):
        if os.listdir(os.path.dirname(file)):
            raise KeyboardInterrupt("killed after shard 1")
        save(file, part, want, start, stop)

    monkeypatch.setattr(bfcl.embed, "save_shard", save_once_then_die)
    with pytest.raises(KeyboardInterrupt):
        embed(data, tmp_path / "resumed", shard_size=8)
    shards = tmp_path / "resumed" / "shards"
    assert os.listdir(shards) == ["00000.safetensors"]
    assert not (tmp_path / "resumed" / "embeddings.safetensors").exists()
    first_shard = (shards / "00000.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(bfcl.embed, "save_shard", save)
    embed_shard = bfcl.embed.embed_shard

    def counted(model, dataset, start, stop, *rest):
        computed.append(start)
        if resuming:  # shard 0 is never rewritten
            assert (shards / "00000.safetensors").stat().st_mtime_ns == first_shard
        return embed_shard(model, dataset, start, stop, *rest)

    monkeypatch.setattr(bfcl.embed, "embed_shard", counted)
    resuming = True
    told.clear()
    _, resumed = embed(data, tmp_path / "resumed", shard_size=8, progress=told.append)
    resuming = False
    assert told == [8] + [4] * 6  # the finished shard, then each batch
    assert computed == [8, 16, 24] and (resumed.shards_computed, resumed.shards_reused) == (3, 1)
    assert not shards.exists()
    for name in ("images.txt", "unreadable.txt"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    a, b = load(str(tmp_path / "straight")), load(str(tmp_path / "resumed"))
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.labels, b.labels) and a.metadata == b.metadata
    # a rerun of the finished command computes and writes nothing
    computed.clear()
    written = (tmp_path / "resumed" / "embeddings.safetensors").stat().st_mtime_ns
    _, again = embed(data, tmp_path / "resumed", shard_size=8)
    assert computed == [] and again.rows == 32 and (again.shards_computed, again.shards_reused) == (0, 4)
    assert (tmp_path / "resumed" / "embeddings.safetensors").stat().st_mtime_ns == written
    _, half = embed(data, tmp_path / "resumed", shard_size=8, dtype=torch.float16)  # another dtype: embedded again
    assert computed == [0, 8, 16, 24] and load(str(tmp_path / "resumed")).matrix.dtype == torch.float16


def test_load_round_trips_and_finds_the_most_similar(data, tmp_path):
    index, _ = embed(data, tmp_path)
    with safe_open(str(tmp_path / "embeddings.safetensors"), framework="pt") as f:
        written = f.get_tensor("embeddings")
    emb = load(str(tmp_path))
    assert torch.equal(emb.matrix, written) and len(emb.paths) == 32
    top = most_similar(emb, "class_2/00005.jpg", k=5)
    s = (emb.matrix @ emb.matrix[21]).tolist()
    expected = sorted((j for j in range(32) if j != 21), key=lambda j: (-s[j], j))[:5]
    assert [p for p, _ in top] == [emb.paths[j] for j in expected]
    assert most_similar(emb, os.path.join(index.root, "class_2/00005.jpg"), k=5) == most_similar(emb, 21, k=5)
    (tmp_path / "images.txt").write_text("\n".join(reversed(emb.paths)) + "\n")
    with pytest.raises(CheckpointError, match="does not belong to"):
        load(str(tmp_path))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_input_each_one_line(data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "a" / "b").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images") as e:
        embed_index(str(empty), None, str(tmp_path / "out-empty"))
    one_line(e)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="1 <= K < N") as e:
        neighbours(x, 5)
    one_line(e)
    indices, scores = neighbours(x, 2)
    for bad in (0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"not a cosine similarity in \(0, 1\]") as e:
            duplicate_groups(indices, scores, bad)
        one_line(e)
    assert duplicate_groups(indices, scores, 1.0) == []
    wrong = dataclasses.replace(random_backbone(), arch="resnet50")  # resnet18 tensors, resnet50 asked
    with pytest.raises(CheckpointError, match="does not fit resnet50") as e:
        embed(data, tmp_path / "out-wrong", wrong)
    one_line(e)
    assert not (tmp_path / "out-wrong" / "embeddings.safetensors").exists()


def test_an_output_folder_of_other_embeddings_is_refused(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    embed(data, out)
    first = load(str(out)).metadata
    other = random_backbone(seed=1)
    with pytest.raises(CheckpointError, match="another backbone weights") as e:
        embed(data, out, other)
    message = one_line(e)
    assert first["weights_sha256"] in message and bfcl.embed.weights_sha256(other.state) in message
    assert "to start over" in message
    index, _ = embed_index(data, None, str(out))
    with pytest.raises(CheckpointError, match="another image list") as e:
        embed_images(random_backbone(), index.subset(range(10)), str(out), image_size=SIZE, batch_size=4)
    assert first["list_sha256"] in one_line(e)
    assert load(str(out)).metadata == first  # nothing was overwritten
    # shards of an interrupted run count too
    monkeypatch.setattr(bfcl.embed, "embed_shard", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    half = tmp_path / "half"
    (half / "shards").mkdir(parents=True)
    part = {"features": torch.zeros(8, 512), "readable": torch.ones(8, dtype=torch.uint8), "unreadable": {}}
    want = {"format": bfcl.embed.FORMAT, "weights_sha256": "0" * 64, "list_sha256": first["list_sha256"],
            "image_size": SIZE, "shard_size": 8}
    bfcl.embed.save_shard(str(half / "shards" / "00000.safetensors"), part, want, 0, 8)
    with pytest.raises(CheckpointError, match="0{64}"):
        embed(data, half, shard_size=8)


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one(data, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "embed_two_process.py")
    data = shutil.copytree(data, tmp_path / "data")
    (data / "train" / "class_2" / "00002.jpg").write_bytes(b"")  # index 18: shard 12-23, batch 16-19, process 1
    for procs, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        result = run([TORCHRUN, "--standalone", "--nproc_per_node", str(procs), script, str(data), str(out)])
        assert result.returncode == 0, result.stdout + result.stderr
    one, two = load(str(tmp_path / "one")), load(str(tmp_path / "two"))
    assert one.paths == two.paths and len(one.paths) == 31 and "class_2/00002.jpg" not in one.paths
    unreadable = [(out / "unreadable.txt").read_text() for out in (tmp_path / "one", tmp_path / "two")]
    assert unreadable[0] == unreadable[1] and unreadable[0].startswith("class_2/00002.jpg\t")
    assert torch.equal(one.matrix, two.matrix) and torch.equal(one.labels, two.labels)
    assert "computed 3 shards" in result.stdout  # 32 images in shards of 12: batches of 4, split 2 + 1
    # another backbone into the same folder: both processes stop with the error, none waits forever
    refused = run([TORCHRUN, "--standalone", "--nproc_per_node", "2", script, str(data), str(tmp_path / "two"), "1"],
                  timeout=120)
    assert refused.returncode != 0
    assert "error (process 0): " in refused.stdout and "error (process 1): " in refused.stdout
    assert "another backbone weights" in refused.stdout
