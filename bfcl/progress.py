"""Training progress for people (a rich bar, or plain lines in logs) and for programs (JSON lines)."""

import json
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from bfcl.paths import atomic_open, printable_text


def format_metrics(metrics: dict) -> str:
    """'loss 1.234 | lr 0.0600 | ...' for the numbers a person watches."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if key != "data_wait" else f"{value:.0%}"
        parts.append(f"{key} {value}")
    return " | ".join(parts)


def _kept_step(line: str, start_step: int) -> bool:
    """Whether a line of an earlier metrics.jsonl belongs to the run resumed at start_step: steps up
    to the checkpoint's, which was written right after its step was logged. A fresh start keeps none;
    a torn last line (a kill mid-write) is dropped."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return False
    return start_step > 0 and isinstance(step, int) and step <= start_step


def truncate_metrics(path: str, start_step: int) -> None:
    """Drop the records of steps after start_step, which the resumed run logs again: a run killed
    between its last checkpoint and the kill would otherwise hold those steps twice. Rewritten
    under a temporary name and renamed, so a kill here leaves the old file or the new one."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as old, atomic_open(path, encoding="utf-8") as new:
        for line in old:
            if line.endswith("\n") and _kept_step(line, start_step):
                new.write(line)


class ProgressLog:
    """Appends every logged record to a JSON-lines file; shows a bar on a terminal, else prints.

    Only the main process should create one. `log(step, metrics)` records and displays;
    `print(text)` writes a line without breaking the bar. A resumed run (start_step > 0) continues
    the file from its checkpoint's step; a fresh start begins it anew.
    """

    def __init__(self, metrics_path: str, total_steps: int, start_step: int, bar: bool | None = None,
                 tracker=None):
        self.tracker = tracker  # --report-to: bfcl.tracking.TrackerLog, given every record too
        truncate_metrics(metrics_path, start_step)
        self.metrics_file = open(metrics_path, "a")
        self.console = Console()
        self.total_steps = total_steps
        self.bar = self.console.is_terminal if bar is None else bar
        self.start_time, self.start_step = time.time(), start_step
        self.progress = None
        if self.bar:
            self.progress = Progress(
                TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            )
            self.task = self.progress.add_task("pretrain", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tracker is not None:
            self.tracker.log(step, metrics)
        shown = {k: v for k, v in metrics.items()
                 if k in ("epoch", "loss", "lr", "m", "img_per_s", "data_wait", "knn_top1", "top1")}
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=format_metrics(shown))
        else:
            elapsed = time.time() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
            print(f"step {step}/{self.total_steps} | {format_metrics(shown)} | eta {eta_text}", flush=True)

    def print(self, text: str) -> None:
        # a path in the line may hold bytes that are not UTF-8 (bfcl/paths.py)
        (self.progress.console if self.progress is not None else self.console).print(printable_text(text),
                                                                                      soft_wrap=True)
        sys.stdout.flush()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.metrics_file.close()


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} images/s" if task.speed else "? images/s")


class CountProgress:
    """A bar of `what` with images/s and the time left on a terminal, else a line every 10 %; yields
    the progress(n) callback (bfcl.embed.embed_images's) on the main process, None on the others."""

    def __init__(self, what: str, total: int, main: bool):
        self.what, self.total, self.main, self.done, self.shown, self.started = what, total, main, 0, 0, time.time()
        self.console = Console()
        self.bar = None
        if main and self.console.is_terminal:
            self.bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                                TimeRemainingColumn(), console=self.console)
            self.task = self.bar.add_task(what, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self.advance if self.main else None

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, advance=n)
        elif self.done * 10 // self.total > self.shown or self.done == self.total:
            self.shown = self.done * 10 // self.total
            rate = self.done / max(time.time() - self.started, 1e-9)
            print(f"{self.what} {self.done}/{self.total} | {rate:,.0f} images/s | "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime((self.total - self.done) / rate))}", flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
