"""A clean stop is recognisable whatever the launcher (issue 33, case 10): under torchrun, a SIGTERM
to the launcher reaches every rank, each checkpoints and exits 75, and OUTPUT/STOPPED says "stopped
cleanly at step N; run the same command to resume" (torchrun itself exits 1); the next run removes
the marker."""

import os
import signal
import subprocess
import time

import pytest

from bfcl.runs import EXIT_PREEMPTED, STOP_MARKER, clear_stop_marker, mark_stopped
from scripts import ENV, REPO, TINY, TORCHRUN, checkpoint_steps, metrics, run

# train.main, recording each rank's exit status in EXIT_DIR/rank<R> before exiting with it
RECORD_EXIT = r"""
import os, sys
sys.path.insert(0, os.getcwd())
import train
code = train.main(sys.argv[1:])
open(os.path.join(os.environ["EXIT_DIR"], f"rank{os.environ['RANK']}"), "w").write(str(code))
sys.exit(code)
"""


def test_marker_is_written_whole_and_cleared(tmp_path):
    mark_stopped(str(tmp_path), 12)
    assert (tmp_path / STOP_MARKER).read_text() == "stopped cleanly at step 12; run the same command to resume\n"
    assert os.listdir(tmp_path) == [STOP_MARKER]  # no temporary left beside it
    clear_stop_marker(str(tmp_path))
    assert os.listdir(tmp_path) == []
    clear_stop_marker(str(tmp_path))  # nothing to clear: no error


@pytest.mark.e2e
def test_sigterm_to_torchrun_stops_every_rank_cleanly_and_the_marker_says_so(tiny_data, tmp_path):
    wrapper, out, exits = tmp_path / "train_recording_exit.py", tmp_path / "run", tmp_path / "exits"
    wrapper.write_text(RECORD_EXIT)
    exits.mkdir()
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), "--data", tiny_data,
           "--output-dir", str(out), *TINY, "--epochs", "100"]  # far more steps than the test waits for
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV, "EXIT_DIR": str(exits)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl") and metrics(out)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun alone, as a scheduler's kill of the launcher
    output = proc.communicate(timeout=240)[0]

    assert proc.returncode == 1, output  # torchrun's own status for a signal: documented in reliability.md
    assert [(exits / f"rank{r}").read_text() for r in (0, 1)] == [str(EXIT_PREEMPTED)] * 2, output
    step = checkpoint_steps(out)[-1]
    assert (out / STOP_MARKER).read_text() == f"stopped cleanly at step {step}; run the same command to resume\n"

    again = run(cmd + ["--max-steps", str(step + 1)], EXIT_DIR=str(exits))  # the same run, resumed
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"(step {step})" in again.stdout and not (out / STOP_MARKER).exists()
