"""probe.py --mode embed end to end, in process: rows and images.txt against the image index train.py
builds, --neighbours against bfcl.neighbours on the loaded matrix, --duplicates against the planted
copies and the components of the whole threshold graph, each bad input's one-line error, and README.md's
embed commands run as written (the snippet's answer against brute force)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import probe
from bfcl.embed import load
from bfcl.export import export_backbone
from bfcl.index import ImageIndex
from bfcl.model import MoCo, build_backbone
from bfcl.neighbours import neighbours
from bfcl.synthetic import make_image_folder, make_unlabelled_folder
from scripts import TORCHRUN, error_of, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--random-init", "-a", "resnet18", "--stem", "small", "--workers", "0", "-b", "4", "--mode", "embed"]


def embed(data, out, *extra) -> dict:
    assert probe.main([*TINY, "--data", str(data), "--output-dir", str(out), *extra]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["results"]["embed"]


def refused(argv) -> str:
    """probe.py's one-line error for argv."""
    return error_of(probe.main, argv)


def saved_index(out) -> list[str]:
    index = ImageIndex.load(os.path.join(out, "image-index.safetensors"))
    return [index.paths[i] for i in range(len(index))]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("labelled")), classes=4, train_per_class=6,
                             val_per_class=2, size=16)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return make_unlabelled_folder(str(tmp_path_factory.mktemp("photos")), images=12, size=16)


def test_an_image_folder_embeds_train_in_index_order_with_labels(labelled, tmp_path):
    out = tmp_path / "out"
    result = embed(labelled, out, "--embed-dtype", "float16")
    emb = load(str(out))
    paths = saved_index(out)  # train/ only: train.py's ImageFolder layout
    assert emb.paths == paths == (out / "images.txt").read_text().split() and len(paths) == 24
    assert paths[0] == "class_0/00000.jpg" and paths[-1] == "class_3/00005.jpg"
    assert emb.labels.tolist() == [int(p[len("class_")]) for p in paths]
    assert emb.matrix.shape == (24, 512) and emb.matrix.dtype == torch.float16
    assert result["rows"] == 24 and result["width"] == 512 and result["unreadable"] == 0
    assert result["shards_computed"] == 1 and result["shards_reused"] == 0
    assert embed(labelled, out, "--embed-dtype", "float16")["shards_reused"] == 1  # a rerun computes nothing
    assert torch.equal(load(str(out)).matrix, emb.matrix)


def test_a_nested_folder_embeds_without_labels_and_neighbours_equal_the_library(photos, tmp_path):
    out = tmp_path / "out"
    result = embed(photos, out, "--neighbours", "3")
    emb = load(str(out))
    assert emb.paths == saved_index(out) and emb.labels is None and len(emb.paths) == 12
    assert emb.paths[0] == "2020/01/IMG_00000.jpg"
    saved = load_file(str(out / "neighbours.safetensors"))
    indices, scores = neighbours(emb.matrix, 3)  # float32, the reference
    assert torch.equal(saved["indices"], indices)
    torch.testing.assert_close(saved["scores"], scores, atol=1e-6, rtol=0)
    rows = (out / "neighbours.csv").read_text().splitlines()
    assert rows[0] == "path,rank,neighbour,score" and len(rows) == 1 + 12 * 3
    assert rows[1].startswith(f"{emb.paths[0]},1,{emb.paths[int(indices[0, 0])]},")
    assert result["neighbours"]["k"] == 3 and result["neighbours"]["peak_block_bytes"] == 4 * 12 * 12
    assert "duplicates" not in result and not (out / "duplicates.csv").exists()


def test_a_list_file_embeds_its_images_in_its_order(photos, tmp_path):
    listed = ["2021/02/IMG_00001.jpg", "2020/01/IMG_00000.jpg", "2020/03/IMG_00008.jpg"]
    list_file = tmp_path / "list.txt"
    list_file.write_text("\n".join(listed) + "\n")
    out = tmp_path / "out"
    embed(photos, out, "--train-list", str(list_file))
    emb = load(str(out))
    assert emb.paths == listed == saved_index(out)
    whole = tmp_path / "whole"
    embed(photos, whole)
    full = load(str(whole))
    rows = [full.paths.index(p) for p in listed]  # the same images give the same rows, whatever the list
    torch.testing.assert_close(emb.matrix, full.matrix[rows], atol=1e-6, rtol=0)


def components(x: torch.Tensor, threshold: float) -> list[list[int]]:
    """Reference: connected components (2 or more rows) of the whole graph of cosine >= threshold."""
    x = F.normalize(x.float(), dim=1)
    s = x @ x.T
    s.fill_diagonal_(-1)
    linked, seen, groups = s >= threshold, set(), []
    for i in range(len(x)):
        if i in seen:
            continue
        group, todo = {i}, [i]
        while todo:
            for j in linked[todo.pop()].nonzero().flatten().tolist():
                if j not in group:
                    group.add(j)
                    todo.append(j)
        seen |= group
        if len(group) > 1:
            groups.append(sorted(group))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_duplicates_finds_the_planted_copies(tmp_path):
    data = make_unlabelled_folder(str(tmp_path / "photos"), images=16, size=32)
    a, b = "2020/01/IMG_00000.jpg", "2021/02/IMG_00001.jpg"
    for copy in ("copy_a1.jpg", "copy_a2.jpg"):  # byte-identical
        shutil.copy(os.path.join(data, a), os.path.join(data, copy))
    ImageOps.mirror(Image.open(os.path.join(data, b))).save(os.path.join(data, "flip_b.jpg"), quality=75)
    Image.open(os.path.join(data, b)).save(os.path.join(data, "reencoded_b.jpg"), quality=60)
    out = tmp_path / "out"
    # 0.99: this random-init backbone scores the planted copies >= 0.996, other pairs <= 0.98
    result = embed(data, out, "--duplicates", "0.99")
    emb = load(str(out))
    lines = (out / "duplicates.csv").read_text().splitlines()
    assert lines[0] == "group,path,score_to_first"
    found = {}
    for line in lines[1:]:
        group, path, score = line.split(",")
        found.setdefault(int(group), []).append(path)
    assert sorted(map(sorted, found.values())) == sorted([sorted([a, "copy_a1.jpg", "copy_a2.jpg"]),
                                                          sorted([b, "flip_b.jpg", "reencoded_b.jpg"])])
    assert [[emb.paths.index(p) for p in found[g]] for g in sorted(found)] == components(emb.matrix, 0.99)
    assert result["duplicates"] == {**result["duplicates"], "threshold": 0.99, "groups": 2, "images": 6}
    assert result["neighbours"]["k"] == 10  # the lists the groups come from
    copies = [line for line in lines[1:] if "copy_a" in line]
    assert all(float(line.split(",")[2]) > 0.99999 for line in copies)


def test_bad_input_gives_one_line_errors(photos, labelled, tmp_path):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "notes.txt").write_text("no images")
    assert "holds no images" in refused([*TINY, "--data", str(empty), "--output-dir", str(tmp_path / "o1")])

    torch.manual_seed(0)
    resnet = build_backbone("resnet18", "small")
    file = str(tmp_path / "resnet18.safetensors")
    save_file({k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}, file,
              {"arch": "resnet18", "stem": "small"})
    message = refused(["--pretrained", file, "--arch", "resnet50", "--mode", "embed", "--data", photos,
                       "--workers", "0", "--output-dir", str(tmp_path / "o2")])
    assert "does not fit resnet50" in message
    vit = build_backbone("vit_tiny", "imagenet", image_size=32, patch_size=8)
    file = str(tmp_path / "vit.safetensors")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("head.")}, file,
              {"arch": "vit_tiny"})
    message = refused(["--pretrained", file, "--image-size", "16", "--mode", "embed", "--data", photos,
                       "--workers", "0", "--output-dir", str(tmp_path / "o3")])
    assert "does not fit vit_tiny, patch 8, 16 px" in message

    assert "1 <= K < N: there are 12 images" in refused([*TINY, "--data", photos, "--neighbours", "12",
                                                         "--output-dir", str(tmp_path / "o4")])
    for bad in ("0", "1.5", "-0.2", "nan"):
        message = refused([*TINY, "--data", photos, "--duplicates", bad, "--output-dir", str(tmp_path / "o5")])
        assert f"--duplicates {float(bad)} is not a cosine similarity in (0, 1]" in message
    assert not (tmp_path / "o4" / "embeddings.safetensors").exists()
    assert not (tmp_path / "o5" / "embeddings.safetensors").exists()

    out = tmp_path / "out"
    embed(photos, out)
    first = load(str(out)).metadata
    message = refused([*TINY, "--data", photos, "--seed", "1", "--output-dir", str(out)])
    assert "another backbone weights" in message and first["weights_sha256"] in message and "start over" in message
    list_file = tmp_path / "list.txt"
    list_file.write_text("2020/01/IMG_00000.jpg\n")
    message = refused([*TINY, "--data", photos, "--train-list", str(list_file), "--output-dir", str(out)])
    assert "another image list" in message and first["list_sha256"] in message
    assert load(str(out)).metadata == first  # nothing overwritten

    message = refused([*TINY, "--data", labelled, "--label-fraction", "0.5", "--output-dir", str(tmp_path / "o6")])
    assert "--label-fraction" in message and "--mode embed" in message


def readme_blocks() -> tuple[str, str]:
    """The ```bash block after README.md's `<!-- embed` marker and the ```python block after it."""
    readme = open(os.path.join(REPO, "README.md")).read()
    marker = readme.index("<!-- embed")
    bash = re.compile(r"```bash\n(.*?)```", re.S).search(readme, marker)
    python = re.compile(r"```python\n(.*?)```", re.S).search(readme, bash.end())
    return bash.group(1), python.group(1)


def test_the_readme_embed_commands_run_as_written(tmp_path, monkeypatch):
    """On a toy run (runs/toy: a random-init export) and a photo folder holding the snippet's
    2021/07/IMG_0042.jpg, a byte-identical copy of another image: the snippet finds that copy first."""
    bash, python = readme_blocks()
    data = make_unlabelled_folder(str(tmp_path / "photos"), images=12, size=16)
    os.makedirs(os.path.join(data, "2021", "07"))
    shutil.copy(os.path.join(data, "2020", "03", "IMG_00002.jpg"), os.path.join(data, "2021", "07", "IMG_0042.jpg"))
    torch.manual_seed(0)
    os.makedirs(tmp_path / "runs" / "toy")
    export_backbone(MoCo("resnet18", "small", dim=16, mlp_dim=32).state_dict(),
                    str(tmp_path / "runs" / "toy" / "backbone.safetensors"), arch="resnet18", image_size=16, step=0,
                    stem="small")
    os.symlink(os.path.join(REPO, "probe.py"), tmp_path / "probe.py")
    env = dict(os.environ, DATA=data, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", bash], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("embeddings.safetensors", "images.txt", "neighbours.csv", "duplicates.csv"):
        assert (tmp_path / "runs" / "embed" / name).exists()
    monkeypatch.chdir(tmp_path)
    *statements, last = python.strip().splitlines()
    namespace = {}
    exec("\n".join(statements), namespace)
    found = eval(last, namespace)
    emb = namespace["emb"]
    assert emb.paths == saved_index(tmp_path / "runs" / "embed") and len(emb.paths) == 13
    x = F.normalize(emb.matrix.float(), dim=1)
    i = emb.paths.index("2021/07/IMG_0042.jpg")
    s = x @ x[i]
    s[i] = -2
    top = s.topk(5)  # reference: brute force over all rows
    assert [p for p, _ in found] == [emb.paths[j] for j in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([c for _, c in found]), top.values, atol=1e-6, rtol=0)
    assert found[0][0] == "2020/03/IMG_00002.jpg" and found[0][1] > 0.9999


@pytest.mark.slow
def test_two_processes_write_the_rows_of_one_and_share_errors(photos, tmp_path):
    """torchrun, 2 CPU processes of batch 4 against 1 of batch 4: the same rows, neighbours and
    duplicates; an output folder of another backbone stops both processes with the one line."""
    extra = ["--data", photos, "--shard-size", "4", "--neighbours", "3", "--duplicates", "0.9"]
    embed(photos, tmp_path / "one", *extra)
    two = tmp_path / "two"
    launch = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "probe.py", *TINY, "-b", "8", *extra]  # 4 a process
    result = run([*launch, "--output-dir", str(two)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, both = load(str(tmp_path / "one")), load(str(two))
    assert one.paths == both.paths and torch.equal(one.matrix, both.matrix)
    assert (tmp_path / "one" / "duplicates.csv").read_bytes() == (two / "duplicates.csv").read_bytes()
    nb_one, nb_two = (load_file(str(out / "neighbours.safetensors")) for out in (tmp_path / "one", two))
    assert torch.equal(nb_one["indices"], nb_two["indices"]) and torch.equal(nb_one["scores"], nb_two["scores"])
    refused = run([*launch, "--seed", "1", "--output-dir", str(two)], timeout=120)
    assert refused.returncode != 0
    errors = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("error: ")]
    # both raise it; torchrun may stop the second process before it prints, once the first has exited
    assert 1 <= len(errors) <= 2 and all("another backbone weights" in line for line in errors)
