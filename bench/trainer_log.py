"""Throughput of a train.py run, read from its metrics.jsonl."""

import json


def trainer_throughput(metrics_path: str, batch: int, warmup_steps: int) -> dict:
    """Images/s over every step after the first log at or past `warmup_steps`, from the log
    times, so sync points, checkpoints and loader restarts in between all count.

    Returns {"img_per_s", "data_wait_s" (seconds per step waiting for the loader), "steps"}.
    """
    records = [json.loads(line) for line in open(metrics_path)]
    first = next(r for r in records if r["step"] >= warmup_steps)
    later = [r for r in records if r["step"] > first["step"]]
    if not later:
        raise ValueError(f"{metrics_path}: no log after step {first['step']}; run more steps or log more often")
    steps = [b["step"] - a["step"] for a, b in zip([first] + later, later)]
    # Each record covers the steps since the previous one: its seconds are steps x batch / img_per_s.
    wait = sum(r["data_wait"] * n * batch / r["img_per_s"] for r, n in zip(later, steps))
    return {"img_per_s": sum(steps) * batch / (later[-1]["time"] - first["time"]), "data_wait_s": wait / sum(steps),
            "steps": (first["step"] + 1, later[-1]["step"])}
