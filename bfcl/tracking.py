"""--report-to: the scalars of metrics.jsonl, at the same steps, in an experiment tracker.

Accelerate's tracker API does the work (Accelerator(log_with=...), init_trackers(project, config),
accelerator.log(values, step)); bfcl only picks the trackers, forwards what ProgressLog records
(bfcl/progress.py) and keeps a tracker from ever stopping a run:

- a tracker whose package is missing is a TrackingError (one line, naming the package) before the
  Accelerator exists, so before any work;
- only the main process logs (ProgressLog lives there; Accelerate's log is main-process only too);
- a resumed run continues the same tracker run where the tracker can (TensorBoard: the same folder,
  <output-dir>/tensorboard; W&B, MLflow, trackio: the run id or name kept in <output-dir>/tracker.json)
  and never logs a step twice: steps up to the last one in metrics.jsonl before this start are skipped
  (a run killed between a log and its checkpoint redoes those steps; metrics.jsonl shows them twice,
  the tracker once);
- a tracker that raises mid-run (disk full, network) is warned about once; training goes on and
  metrics.jsonl stays the record.

The trackers are optional extras (pip install 'bfcl[trackers]'); a run without --report-to needs none.
"""

import importlib.util
import json
import os
import sys
import uuid

from bfcl.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
REPORT_TO = ("none",) + TRACKERS + ("all",)
PROJECT = "bfcl"
RUN_FILE = "tracker.json"  # in --output-dir: the tracker run a resume continues


class TrackingError(ConfigError):
    """A tracker that cannot be used: its package is not installed."""


def installed(tracker: str) -> bool:
    return importlib.util.find_spec(tracker) is not None  # each tracker's package has its name


def trackers_for(report_to: str) -> list[str]:
    """The trackers --report-to names: none -> [], all -> every installed one, else that one if installed."""
    if report_to == "none":
        return []
    if report_to == "all":
        found = [t for t in TRACKERS if installed(t)]
        if not found:
            raise TrackingError(f"--report-to all found none of {', '.join(TRACKERS)} installed; "
                                "pip install 'bfcl[trackers]' or one of them")
        return found
    if report_to not in TRACKERS:
        raise TrackingError(f"--report-to {report_to} is not one of {', '.join(REPORT_TO)}")
    if not installed(report_to):
        raise TrackingError(f"--report-to {report_to} needs the {report_to} package, which is not installed; "
                            f"pip install {report_to} (or 'bfcl[trackers]'), or pass --report-to none")
    return [report_to]


def run_identity(output_dir: str) -> dict:
    """The id and name of this output folder's tracker run: read from tracker.json, else new ones
    (written by start_trackers, so that a resume finds them)."""
    try:
        with open(os.path.join(output_dir, RUN_FILE)) as f:
            saved = json.load(f)
        if isinstance(saved.get("id"), str) and isinstance(saved.get("name"), str):
            return saved
    except (OSError, ValueError, AttributeError):
        pass
    return {"id": uuid.uuid4().hex[:16], "name": os.path.basename(os.path.abspath(output_dir))}


def tracker_objects(names: list[str], output_dir: str) -> list:
    """Accelerate tracker objects for Accelerator(log_with=...), each pointed at this run:
    TensorBoard writes <output-dir>/tensorboard, the others resume the run in tracker.json."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    run = run_identity(output_dir)
    make = {
        "tensorboard": lambda: TensorBoardTracker("tensorboard", output_dir),
        "wandb": lambda: WandBTracker(PROJECT, id=run["id"], name=run["name"], resume="allow", dir=output_dir),
        "mlflow": lambda: MLflowTracker(PROJECT, logging_dir=os.path.join(output_dir, "mlruns"),
                                        run_id=run.get("mlflow_run_id"), run_name=run["name"]),
        "trackio": lambda: TrackioTracker(PROJECT, name=run["name"], resume="allow"),
    }
    return [make[name]() for name in names]


def tracker_name(tracker) -> str:
    """'mlflow' for Accelerate's tracker object or LoggerType, not the object's repr."""
    name = getattr(tracker, "value", None) or getattr(tracker, "name", None)
    return name if isinstance(name, str) else str(tracker)


def hyperparameters(config: dict) -> dict:
    """The config as tracker hyper-parameters: bool/int/float/str kept, None and the rest as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) if isinstance(v, (list, dict))
            else str(v) for k, v in config.items()}


def last_logged_step(metrics_path: str) -> int:
    """The highest step in metrics.jsonl (-1 when there is none): what the tracker already has."""
    last = -1
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    step = json.loads(line).get("step")
                except (ValueError, AttributeError):
                    continue  # a line cut by a kill
                if isinstance(step, int):
                    last = max(last, step)
    except OSError:
        pass
    return last


def start_trackers(accelerator, output_dir: str, config: dict) -> None:
    """init_trackers with the config as hyper-parameters, then record the run's identity (and
    MLflow's run id) in tracker.json for a resume. Any failure is a TrackingError in one line."""
    if not accelerator.log_with:
        return
    try:
        accelerator.init_trackers(PROJECT, hyperparameters(config))
    except Exception as e:  # a tracker's own start-up: login, server, permissions
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        names = ", ".join(tracker_name(t) for t in accelerator.log_with)
        raise TrackingError(f"--report-to: starting {names} failed ({first}); "
                            "fix the tracker's set-up or pass --report-to none") from None
    if accelerator.is_main_process:
        run = run_identity(output_dir)
        for tracker in accelerator.trackers:
            active = getattr(tracker, "active_run", None)  # MLflow's
            if active is not None:
                run["mlflow_run_id"] = active.info.run_id
        with open(os.path.join(output_dir, RUN_FILE), "w") as f:
            json.dump(run, f)


class TrackerLog:
    """What ProgressLog forwards each record to: its numeric scalars, once per step, to every
    tracker of the Accelerator. Create it on the main process, before ProgressLog opens the file."""

    def __init__(self, accelerator, metrics_path: str, warn=None):
        self.accelerator = accelerator
        self.after_step = last_logged_step(metrics_path)
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.failures = 0

    def log(self, step: int, metrics: dict) -> None:
        if step <= self.after_step:
            return
        self.after_step = step
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            self.accelerator.log(values, step=step)
        except Exception as e:  # the tracker's disk or network; metrics.jsonl has the record
            self.failures += 1
            if self.failures == 1:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.warn(f"warning: the tracker failed at step {step} ({first}); training goes on, "
                          "metrics.jsonl keeps the record")


def tracker_log(accelerator, metrics_path: str, warn=None) -> TrackerLog | None:
    """A TrackerLog when --report-to started trackers, else None (ProgressLog then only writes the file)."""
    return TrackerLog(accelerator, metrics_path, warn) if accelerator.log_with else None


def flat_scalars(results: dict, prefix: str = "") -> dict:
    """{"knn": {"top1": 50.1}, ...} -> {"knn/top1": 50.1, ...}: the numbers of probe.py's results."""
    out = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def log_results(accelerator, results: dict, step: int | None = None) -> None:
    """probe.py's final results (results.json's numbers) to the trackers, once; a failure is a warning."""
    if not accelerator.log_with or not accelerator.is_main_process:
        return
    try:
        accelerator.log(flat_scalars(results), step=step)
    except Exception as e:  # results.json has them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"warning: the tracker failed logging the results ({first}); results.json has them", file=sys.stderr)
