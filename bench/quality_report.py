"""bench/quality.py's outputs: the markdown tables, results.json and an SVG plot written by hand
(no plotting library: the project adds no dependency for one figure)."""

import math
import os
import statistics
from xml.sax.saxutils import escape

from harness import mean_std, provenance, write_results

# (table row name, run name in the records)
EQUAL_TIME_ROWS = (("random init", "random-init"), ("MoCo v3", "moco"), ("MoCo v3 + BatchFormer", "bf"))
EQUAL_STEP_ROWS = (("MoCo v3", "moco"), ("MoCo v3 + BatchFormer", "bf-equal-steps"))
SERIES = {"moco": ("MoCo v3", "#1f77b4"), "bf": ("MoCo v3 + BatchFormer", "#d62728"),
          "bf-equal-steps": ("MoCo v3 + BatchFormer, equal steps", "#2ca02c")}
DASHES = ("", "7 3", "2 3", "10 3 2 3")


def table(records: list[dict], rows) -> str:
    lines = ["| method | kNN top-1 | fast-linear top-1 | steps | wall-clock (min) | train img/s | seeds |",
             "|---|---|---|---|---|---|---|"]
    for label, name in rows:
        rs = [r for r in records if r["name"] == name]
        if not rs:
            continue
        trained = name != "random-init"
        lines.append(f"| {label} | {mean_std([r['knn_top1'] for r in rs])} | "
                     f"{mean_std([r['linear_top1'] for r in rs])} | "
                     f"{mean_std([r['steps'] for r in rs], 0) if trained else 0} | "
                     f"{mean_std([r['wall_s'] / 60 for r in rs]) if trained else '–'} | "
                     f"{mean_std([r['img_per_s'] for r in rs], 0) if trained else '–'} | {len(rs)} |")
    return "\n".join(lines)


def paired_gain(records: list[dict], name: str, metric: str) -> str:
    """BatchFormer run minus the same seed's MoCo v3 run, mean ± std over seeds."""
    base = {r["seed"]: r[metric] for r in records if r["name"] == "moco"}
    diffs = [r[metric] - base[r["seed"]] for r in records if r["name"] == name and r["seed"] in base]
    return ("+" if diffs and statistics.mean(diffs) >= 0 else "") + mean_std(diffs)


def per_run_table(records: list[dict]) -> str:
    lines = ["| run | seed | kNN top-1 | fast-linear top-1 | steps | wall-clock (min) | stopped at 1.5x budget |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['seed']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | {r['steps']} | "
                     f"{r['wall_s'] / 60:.2f} | {'yes' if r.get('stopped_at_budget') else 'no'} |")
    return "\n".join(lines)


def markdown(info: dict, cal: dict, records: list[dict]) -> tuple[str, str]:
    """(the whole results.md, the equal-wall-clock table alone)."""
    main_table = table(records, EQUAL_TIME_ROWS)
    gains = [f"- BatchFormer − MoCo v3, paired by seed, kNN top-1: {paired_gain(records, 'bf', 'knn_top1')} at equal "
             f"wall-clock"]
    if any(r["name"] == "bf-equal-steps" for r in records):
        gains[0] += f", {paired_gain(records, 'bf-equal-steps', 'knn_top1')} at equal steps"
    gains.append(f"- fast-linear top-1: {paired_gain(records, 'bf', 'linear_top1')} at equal wall-clock" +
                 (f", {paired_gain(records, 'bf-equal-steps', 'linear_top1')} at equal steps"
                  if any(r["name"] == "bf-equal-steps" for r in records) else ""))
    text = [
        f"# Pretraining quality on {info.get('data_name', 'CIFAR-10')}, {info['budget_min']:g} min per run",
        "",
        *provenance(info),
        f"- data: {info['data']} ({info['steps_per_epoch']} steps per epoch)",
        f"- launch: {info['launch']}",
        f"- recipe: `{info['recipe']}`, warmup {info['warmup_share']:.0%} of the run; "
        f"BatchFormer: {info['bf_loss']} loss, {'trainable' if info['bf_trainable'] else 'frozen at init'}",
        "- kNN: k = 200, T = 0.07, all train images as the bank, val as queries (probe.py --mode knn); "
        "fast-linear: linear head on cached centre-crop features (probe.py --mode fast-linear), not the protocol",
        "",
        f"## Equal wall-clock ({info['budget_min']:g} min per pretraining run, startup and monitor included)",
        "",
        main_table,
        "",
    ]
    if any(r["name"] == "bf-equal-steps" for r in records):
        text += ["## Equal steps (BatchFormer trained as many steps as MoCo v3, however long it took)", "",
                 table(records, EQUAL_STEP_ROWS), ""]
    text += ["## BatchFormer against MoCo v3", "", *gains, "",
             "## Calibration (short timed runs that set each run's step count)", "",
             "| recipe | s/step | monitor pass (s) | startup (s) | checkpoint + exit (s) |", "|---|---|---|---|---|"]
    for name, c in cal.items():
        text.append(f"| {'MoCo v3 + BatchFormer' if c['bf'] else 'MoCo v3'} | {c['step_s']:.3f} | "
                    f"{c['monitor_s']:.1f} | {c['startup_s']:.1f} | {c['checkpoint_exit_s']:.1f} |")
    text += ["", "## Every run", "", per_run_table(records), "",
             "![online kNN monitor](knn_curve.svg)", ""]
    return "\n".join(text), main_table


# ---- the plot ---------------------------------------------------------------------------------

def nice_step(span: float, ticks: int = 5) -> float:
    """A 1-2-5 tick spacing giving about `ticks` ticks over span."""
    raw = max(span, 1e-9) / ticks
    scale = 10 ** math.floor(math.log10(raw))
    return next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)


def panel(x0: float, records: list[dict], key: str, xlabel: str, width: float, height: float,
          y_max: float, series: dict = SERIES) -> list[str]:
    """One axes box at horizontal offset x0: knn_top1 against `key` for every trained run."""
    left, top, w, h = x0 + 55, 30, width - 75, height - 80
    step = nice_step(max([p[key] for r in records for p in r["curve"]] + [1e-9]))
    x_max = step * math.ceil(max([p[key] for r in records for p in r["curve"]] + [1e-9]) / step)
    sx = lambda v: left + w * v / x_max
    sy = lambda v: top + h * (1 - v / y_max)
    out = [f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    v = 0.0
    while v <= x_max + 1e-9:
        label = f"{round(v, 6):g}"
        out += [f'<line x1="{sx(v):.1f}" y1="{top}" x2="{sx(v):.1f}" y2="{top + h}" stroke="#ddd"/>',
                f'<text x="{sx(v):.1f}" y="{top + h + 16}" text-anchor="middle">{label}</text>']
        v += step
    for v in range(0, int(y_max) + 1, 10):
        out += [f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + w}" y2="{sy(v):.1f}" stroke="#ddd"/>',
                f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>']
    out += [f'<text x="{left + w / 2}" y="{top + h + 36}" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text x="{x0 + 14}" y="{top + h / 2}" text-anchor="middle" '
            f'transform="rotate(-90 {x0 + 14} {top + h / 2})">kNN top-1 (%), online monitor</text>']
    for r in records:
        if not r["curve"] or r["name"] not in series:
            continue
        points = " ".join(f"{sx(p[key]):.1f},{sy(p['knn_top1']):.1f}" for p in r["curve"])
        dash = DASHES[r["seed"] % len(DASHES)]
        out.append(f'<polyline points="{points}" fill="none" stroke="{series[r["name"]][1]}" stroke-width="2"'
                   + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
    return out


def svg(records: list[dict], title: str, series: dict = SERIES) -> str:
    """The online kNN curves of the runs named in `series` ({name: (label, colour)}), against
    wall-clock and against steps; one line style per seed."""
    width, height, panel_w = 980, 420, 490
    curves = [p["knn_top1"] for r in records for p in r["curve"]]
    y_max = max(10.0, 10 * (int(max(curves + [0.0]) // 10) + 1))
    body = [f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    body += panel(0, records, "minutes", "wall-clock since the run started (min)", panel_w, height - 40, y_max, series)
    body += panel(panel_w, records, "step", "training step", panel_w, height - 40, y_max, series)
    y = height - 22
    x = 60
    names = [n for n in series if any(r["name"] == n and r["curve"] for r in records)]
    for n in names:
        label, color = series[n]
        body += [f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{color}" stroke-width="2"/>',
                 f'<text x="{x + 30}" y="{y + 4}">{escape(label)}</text>']
        x += 40 + 7 * len(label)
    seeds = sorted({r["seed"] for r in records})
    if len(seeds) > 1:
        body.append(f'<text x="{x}" y="{y + 4}">line style: seed {", ".join(map(str, seeds))} '
                    '(solid, dashed, dotted, ...)</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def write_report(out: str, info: dict, cal: dict, records: list[dict]) -> str:
    """Write results.md, results.json and knn_curve.svg into out; return the main table."""
    text, main_table = markdown(info, cal, records)
    write_results(out, text, {**info, "calibration": cal, "runs": records})
    title = (f"{info.get('data_name', 'CIFAR-10')}, {info['budget_min']:g} min per run: online kNN monitor "
             f"({info['hardware']['cpu']})")
    with open(os.path.join(out, "knn_curve.svg"), "w") as f:
        f.write(svg(records, title))
    return main_table
