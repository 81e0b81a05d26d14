"""The README's promises, run: the quickstart's CPU commands at toy size, the SLURM batch script against
stand-ins for SLURM's tools, the notebook example, the module map, every link between README.md and docs/, and every
`docs/<page>.md#<anchor>` that code cites.

The quickstart is the ```bash block after the `<!-- quickstart` marker in README.md. It runs in bash as
written, in a temporary folder that links train.py, probe.py and accelerate_configs/, with only these size
flags changed (SHRINK):

    --train-per-class N -> 32, --val-per-class N -> 16      the generated set: 128 train and 64 val images
    -b N -> 32, --epochs N -> 1                             4 pretraining steps, 4 fine-tuning steps

and OMP_NUM_THREADS=1, since two compute threads per process stall when other jobs share the cores.

If a command there stops working (a renamed flag, a moved file, a changed default), this test fails.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torchvision
from safetensors.torch import load_file

from bfcl.recipes import RECIPES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRINK = [(r"--train-per-class \d+", "--train-per-class 32"), (r"--val-per-class \d+", "--val-per-class 16"),
          (r"(?<=\s)-b \d+", "-b 32"), (r"--epochs \d+", "--epochs 1")]
TRAIN_IMAGES, VAL_IMAGES, CLASSES, BATCH, EPOCHS = 4 * 32, 4 * 16, 4, 32, 1


def quickstart_block(readme: str) -> str:
    """The first ```bash block after the quickstart marker."""
    marker = readme.index("<!-- quickstart")
    match = re.compile(r"```bash\n(.*?)```", re.S).search(readme, marker)
    assert match, "README.md: no ```bash block after the <!-- quickstart --> marker"
    return match.group(1)


def shrink(block: str) -> str:
    for pattern, replacement in SHRINK:
        block, count = re.subn(pattern, replacement, block)
        assert count, f"the quickstart no longer has {pattern!r}: update SHRINK and this test's docstring"
    return block


def commands(block: str) -> list[list[str]]:
    """Each command of the block as argv words: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def flag(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else default


def test_shrink_changes_only_size_flags():
    block = "python -m bfcl.synthetic d --train-per-class 256 --val-per-class 64 --size 32\n" \
            "accelerate launch train.py --data d --recipe small-images -b 64 --epochs 20\n" \
            "accelerate launch probe.py --data d --mode finetune -b 64 --epochs 10\n"
    assert shrink(block) == ("python -m bfcl.synthetic d --train-per-class 32 --val-per-class 16 --size 32\n"
                             "accelerate launch train.py --data d --recipe small-images -b 32 --epochs 1\n"
                             "accelerate launch probe.py --data d --mode finetune -b 32 --epochs 1\n")
    assert commands("a --x 1 \\\n    --y 2   # note\n# comment\n\nb\n") == [["a", "--x", "1", "--y", "2"], ["b"]]


@pytest.mark.slow
def test_quickstart_runs_as_written_at_toy_size(tmp_path):
    block = shrink(quickstart_block(open(os.path.join(REPO, "README.md")).read()))
    argvs = commands(block)
    trains = [a for a in argvs if "train.py" in a]
    probes = [a for a in argvs if "probe.py" in a]
    assert trains and probes, "the quickstart should pretrain with train.py and score with probe.py"
    assert all(flag(a, "--recipe") == "small-images" for a in trains), "the quickstart pretrains with the recipe"
    for name in ("train.py", "probe.py", "accelerate_configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    # its own process group, so that a timeout ends the scripts the block started, not only bash
    run = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = run.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode == 0, log[-6000:]
    assert "auto:" in log, "the start-up summary should say what --mixed-precision auto chose and why"
    assert "small-images: -a resnet18" in log, "the start-up summary should say what the recipe set"

    steps = EPOCHS * TRAIN_IMAGES // BATCH
    for argv in trains:  # the export is a torchvision ResNet's
        out = tmp_path / flag(argv, "--output-dir", "runs/pretrain")
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert records[-1]["step"] == steps
        recipe = RECIPES[flag(argv, "--recipe")] if "--recipe" in argv else {}
        arch = flag(argv, "-a", flag(argv, "--arch", recipe.get("arch", "resnet50")))
        missing, unexpected = getattr(torchvision.models, arch)().load_state_dict(
            load_file(out / "backbone.safetensors"), strict=False)
        assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected

    for argv in probes:
        results = json.load(open(tmp_path / flag(argv, "--output-dir", "runs/probe") / "results.json"))
        assert (results["num_classes"], results["val_samples"]) == (CLASSES, VAL_IMAGES)
        mode = flag(argv, "--mode", "linear")
        if mode == "quick":
            assert set(results["results"]) == {"knn", "fast_linear"}
            assert_share_of(results["results"]["knn"]["k200"]["top1"], VAL_IMAGES)
        if mode == "finetune":
            assert results["results"]["finetune"]["steps"] == steps
            assert_share_of(results["results"]["finetune"]["last"]["top1"], VAL_IMAGES)


def assert_share_of(top1: float, images: int) -> None:
    """top1 is a percentage of `images` answers: a whole number of them, between none and all."""
    correct = top1 * images / 100
    assert 0 <= round(correct) <= images and correct == pytest.approx(round(correct), abs=1e-6), (top1, images)


# --- the SLURM batch script -------------------------------------------------------------------------------

STUBS = {
    # scontrol show hostnames LIST: one host a line, in the job's order
    "scontrol": 'test "$1 $2" = "show hostnames" && tr , "\\n" <<< "$3"',
    # srun: one task per node, as SLURM starts them, each with its SLURM_NODEID
    "srun": 'while [[ $1 == --* ]]; do shift; done\n'
            'for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" || exit; done',
    # accelerate: record the working folder and the arguments, one a line
    "accelerate": '{ pwd; printf "%s\\n" "$@"; } > "$STUB_LOG/accelerate.$SLURM_NODEID"',
    "nvidia-smi": 'test "$1" = --list-gpus && printf "GPU 0: H100\\nGPU 1: H100\\nGPU 2: H100\\nGPU 3: H100\\n"',
}


@pytest.mark.parametrize("gpus_on_node", ["8", None])  # None: SLURM does not say, nvidia-smi lists 4
def test_slurm_script_starts_one_launcher_per_node_with_ranks_from_slurm(tmp_path, gpus_on_node):
    from accelerate.commands.launch import launch_command_parser

    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(log), SLURM_JOB_NODELIST="gpu-a17,gpu-b03",
               SLURM_NNODES="2", SLURM_SUBMIT_DIR=REPO)
    if gpus_on_node:
        env["SLURM_GPUS_ON_NODE"] = gpus_on_node
    script_args = ["--data", "/data/image net", "--add_bf", "1"]
    run = subprocess.run(["bash", os.path.join(REPO, "accelerate_configs", "slurm.sbatch"), *script_args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr

    processes = 2 * (int(gpus_on_node) if gpus_on_node else 4)
    for rank in (0, 1):
        cwd, *argv = (log / f"accelerate.{rank}").read_text().splitlines()
        assert cwd == REPO and argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])  # accelerate's own parser: the flags exist
        assert (args.config_file, args.num_machines, args.num_processes, args.machine_rank) == \
            ("accelerate_configs/multi_node.yaml", 2, processes, rank)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-a17", 29500)
        assert args.training_script == "train.py" and args.training_script_args == script_args


REQUEUE_STUBS = {
    **STUBS,
    # scontrol: hostnames as above; `requeue JOB` recorded
    "scontrol": 'if test "$1" = requeue; then echo "requeue $2" >> "$STUB_LOG/scontrol"; '
                'else tr , "\\n" <<< "$3"; fi',
    # srun: as SLURM, passes a SIGTERM on to its task
    "srun": 'while [[ $1 == --* ]]; do shift; done\n'
            'trap \'kill -TERM $task\' TERM\n'
            'SLURM_NODEID=0 "$@" & task=$!\n'
            'wait $task; while kill -0 $task 2>/dev/null; do wait $task; done; wait $task',
    # accelerate: a run that trains until a SIGTERM, then stops as train.py does (or, STUB_CRASH, fails)
    "accelerate": 'trap \'if [ -z "$STUB_CRASH" ]; then echo "stopped cleanly at step 7; run the same command '
                  'to resume" > "$STUB_OUT/STOPPED"; fi; exit 1\' TERM\n'
                  'touch "$STUB_LOG/started"; while true; do sleep 0.05; done',
}


@pytest.mark.parametrize("crash", [False, True])
def test_slurm_script_stops_cleanly_on_the_warning_signal_and_requeues(tmp_path, crash):
    """#SBATCH --signal=B:USR1@180: on USR1 the batch script sends SIGTERM to the run, waits for its
    clean stop (OUTPUT/STOPPED) and requeues the job; a run that fails on the signal is not requeued."""
    bin_dir, log, out = tmp_path / "bin", tmp_path / "log", tmp_path / "out dir"
    for folder in (bin_dir, log, out):
        folder.mkdir()
    for name, body in REQUEUE_STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    script = open(os.path.join(REPO, "accelerate_configs", "slurm.sbatch")).read()
    assert "#SBATCH --signal=B:USR1@" in script and "#SBATCH --requeue" in script
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", STUB_LOG=str(log), STUB_OUT=str(out),
               SLURM_JOB_NODELIST="gpu-a17", SLURM_NNODES="1", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=REPO,
               SLURM_GPUS_ON_NODE="8", **({"STUB_CRASH": "1"} if crash else {}))
    job = subprocess.Popen(["bash", os.path.join(REPO, "accelerate_configs", "slurm.sbatch"), "--data", "d",
                            "--output-dir", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends 180 s before the time limit
    output = job.communicate(timeout=30)[0]
    if crash:
        assert job.returncode != 0 and not (log / "scontrol").exists(), output
    else:
        assert job.returncode == 0, output
        assert (log / "scontrol").read_text() == "requeue 4242\n"
        assert "stopped cleanly at step 7" in output and "requeueing job 4242" in output


def test_slurm_script_outside_slurm_says_how_to_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run = subprocess.run(["bash", os.path.join(REPO, "accelerate_configs", "slurm.sbatch"), "--data", "d"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "SLURM_JOB_NODELIST" in run.stderr and "sbatch" in run.stderr


# --- links ------------------------------------------------------------------------------------------------

def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_anchor_slugs_follow_github():
    assert anchors("# ViT: MoCo v3's ViT recipe\n## `--mode finetune`, end to end\n") == \
        {"vit-moco-v3s-vit-recipe", "--mode-finetune-end-to-end"}


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(REPO, "docs")))
                                                 if f.endswith(".md")])
def test_links_between_readme_and_docs_resolve(page):
    text = open(os.path.join(REPO, page)).read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
        assert os.path.exists(file), f"{page}: the link {target} points to no file"
        if anchor:
            assert anchor in anchors(open(file).read()), f"{page}: the link {target} points to no heading"


def test_readme_stays_a_guide_of_at_most_300_lines():
    assert len(open(os.path.join(REPO, "README.md")).read().splitlines()) <= 300


# --- the notebook example ---------------------------------------------------------------------------------

def test_readme_notebook_example_is_the_one_test_library_runs():
    from test_library import NOTEBOOK_EXAMPLE

    readme = open(os.path.join(REPO, "README.md")).read()
    match = re.compile(r"```python\n(.*?)```", re.S).search(readme, readme.index("<!-- notebook"))
    assert match and match.group(1) == NOTEBOOK_EXAMPLE, \
        "README.md's notebook block differs from tests/test_library.py's NOTEBOOK_EXAMPLE: make them the same"


# --- the module map and the citations in code ---------------------------------------------------------------

def module_map(readme: str) -> str:
    """The first ``` block after the module map marker."""
    marker = readme.index("<!-- module map")
    match = re.compile(r"```\n(.*?)```", re.S).search(readme, marker)
    assert match, "README.md: no ``` block after the <!-- module map --> marker"
    return match.group(1)


def test_module_map_names_every_file_of_bfcl_and_bench_and_no_other():
    named = set(re.findall(r"(?<![\w/])((?:bfcl|bench)/[\w.]+\.\w+|train\.py|probe\.py)",
                           module_map(open(os.path.join(REPO, "README.md")).read())))
    files = {"train.py", "probe.py"} | {f"{folder}/{name}" for folder in ("bfcl", "bench")
                                        for name in os.listdir(os.path.join(REPO, folder))
                                        if os.path.isfile(os.path.join(REPO, folder, name)) and not name.startswith(".")
                                        and name.endswith((".py", ".sh"))}
    assert not sorted(files - named), f"README.md's module map misses {sorted(files - named)}: add each under its role"
    assert not sorted(named - files), f"README.md's module map names {sorted(named - files)}, which do not exist"


def code_files() -> list[str]:
    files = [os.path.join(REPO, name) for name in ("train.py", "probe.py")]
    for folder in ("bfcl", "bench", "tests"):
        files += [os.path.join(REPO, folder, name) for name in sorted(os.listdir(os.path.join(REPO, folder)))
                  if name.endswith((".py", ".sh"))]
    return files


def test_code_cites_docs_anchors_that_exist():
    """`docs/method.md#moco-v3` and `docs/method.md#moco-v3, #batchformer` in comments lead to headings."""
    for path in code_files():
        for page, tail in re.findall(r"docs/([\w-]+\.md)((?:#[\w-]+)(?:, #[\w-]+)*)", open(path).read()):
            doc = os.path.join(REPO, "docs", page)
            assert os.path.exists(doc), f"{path}: cites docs/{page}, which does not exist"
            for anchor in re.findall(r"#([\w-]+)", tail):
                assert anchor in anchors(open(doc).read()), f"{path}: cites docs/{page}#{anchor}, which is no heading"


def test_code_cites_no_file_outside_the_repository():
    """Citations of the method notes and the style guide that were never part of the repository: cite
    docs/method.md#<anchor> instead."""
    outside = re.compile(r"(?<!docs/)method\.md §|style\.md")
    offenders = [f"{os.path.relpath(path, REPO)}:{number}" for path in code_files()
                 for number, line in enumerate(open(path), 1) if outside.search(line)]
    assert not offenders, f"cite docs/method.md#<anchor> instead of files outside the repository: {offenders}"
