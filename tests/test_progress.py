"""metrics.jsonl across a kill and a resume: each step is logged once (docs/reliability.md)."""

import json

from bfcl.progress import ProgressLog


def _steps(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def _write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_resume_drops_steps_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # a run logged steps 0..50, checkpointed at step 30 and was killed after logging step 50
    _write(path, [json.dumps({"step": s, "loss": 1.0}) for s in (0, 10, 20, 30, 40, 50)])
    log = ProgressLog(str(path), total_steps=100, start_step=30, bar=False)
    for step in (40, 50, 60):
        log.log(step, {"loss": 0.5})
    log.close()
    assert _steps(path) == [0, 10, 20, 30, 40, 50, 60]
    with open(path) as f:
        assert [json.loads(line)["loss"] for line in f][4:] == [0.5, 0.5, 0.5]


def test_torn_last_line_of_a_killed_run_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [json.dumps({"step": 10}), json.dumps({"step": 20}), '{"step": 30, "lo'])
    ProgressLog(str(path), total_steps=100, start_step=20, bar=False).close()
    assert _steps(path) == [10, 20]


def test_fresh_start_begins_an_empty_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [json.dumps({"step": 0}), json.dumps({"step": 10})])
    log = ProgressLog(str(path), total_steps=100, start_step=0, bar=False)
    log.log(0, {"knn_top1": 10.0})
    log.close()
    assert _steps(path) == [0]


def test_first_start_creates_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = ProgressLog(str(path), total_steps=10, start_step=0, bar=False)
    log.log(5, {"loss": 1.0})
    log.close()
    assert _steps(path) == [5]
