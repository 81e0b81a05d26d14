"""bench/downstream.py's outputs: results.md, results.json and downstream.svg (top-1 against the label
fraction, log x; an SVG written by hand by line_plot, which bench/longtail.py's plot uses too), and the
lr sweep's sweep.md."""

import math
import os
import statistics
from xml.sax.saxutils import escape

from harness import mean_std, provenance, write_results

STARTS = ("pretrained", "random-init")
# (key, label, colour); one line per start (solid: pretrained, dashed: random init) and method
METHODS = (("knn", "kNN k20", "#1f77b4"), ("fast_linear", "fast-linear", "#ff7f0e"),
           ("finetune", "fine-tune", "#2ca02c"), ("finetune_bf", "fine-tune + BatchFormer", "#d62728"))
DASH = {"pretrained": "", "random-init": "7 4"}


def labels(fraction: float, samples: int | None = None) -> str:
    return f"{100 * fraction:g} %" + (f" ({samples})" if samples is not None else "")


def scores(quick: list[dict], records: list[dict], start: str, fraction: float) -> dict:
    """{method: [top-1 per seed]} of one start at one fraction."""
    q = [r for r in quick if r["start"] == start and r["fraction"] == fraction]
    ft = [r for r in records if r["start"] == start and r["fraction"] == fraction]
    return {"knn": [r["knn_top1"] for r in q], "fast_linear": [r["fast_linear_top1"] for r in q],
            "finetune": [r["top1"] for r in ft if not r["bf"]], "finetune_bf": [r["top1"] for r in ft if r["bf"]]}


def paired(records: list[dict], fraction: float, a: dict, b: dict) -> list[float]:
    """Top-1 of the runs matching a minus the same seed's run matching b, at one fraction."""
    match = lambda r, m: r["fraction"] == fraction and all(r[k] == v for k, v in m.items())
    base = {r["seed"]: r["top1"] for r in records if match(r, b)}
    return [r["top1"] - base[r["seed"]] for r in records if match(r, a) and r["seed"] in base]


def signed(diffs: list[float]) -> str:
    """'+2.1 ± 0.4 (beyond 2 std)' over seeds; '–' when nothing was run."""
    if not diffs:
        return "–"
    text = ("+" if statistics.mean(diffs) >= 0 else "") + mean_std(diffs)
    if len(diffs) > 1 and abs(statistics.mean(diffs)) > 2 * statistics.stdev(diffs):
        text += " (beyond 2 std)"
    return text


def markdown(info: dict, quick: list[dict], records: list[dict]) -> str:
    fractions = info["fractions"]
    samples = {r["fraction"]: r["subset"]["train_samples"] for r in quick}
    budget = f"{info['ft_steps']} steps" if info["ft_steps"] else \
        ", ".join(f"{m:g} min at {labels(f)}" for f, m in zip(fractions, info["ft_min"]))
    shares = ", ".join(labels(f) for f in fractions)
    text = [f"# Few labels: bfcl-pretrained vs random init, {shares} of the labels", "",
            *provenance(info),
            f"- backbone: {info['pretrained']}; random init: `{info['random_init']}`",
            f"- labelled subsets: class-balanced, subset seed {info['subset_seed']}, the same for every run "
            f"(probe.py --label-fraction); fine-tuning seeds 0..{info['seeds'] - 1} on the same subset",
            f"- fine-tuning: each start's recipe (probe.py picks it), batch {info['batch_size']}, precision "
            f"{info['precision']}, budget per run: {budget}; top-1 of the final model on all of val/",
            "- kNN: k 20, T 0.07, the labelled subset as the bank; fast-linear: linear head on cached centre-crop "
            "features of the subset (not the protocol)", "",
            "## Top-1 (%) on val/, mean ± std over fine-tuning seeds", "",
            "| labels (images) | start | kNN | fast-linear | fine-tune | fine-tune + BatchFormer |",
            "|---|---|---|---|---|---|"]
    for f in fractions:
        for start in STARTS:
            s = scores(quick, records, start, f)
            text.append(f"| {labels(f, samples.get(f))} | {start} | "
                        + " | ".join(mean_std(s[key]) for key, _, _ in METHODS) + " |")
    text += ["", "## Paired differences in fine-tuning top-1 (by seed, mean ± std)", "",
             "| labels | pretrained − random init | BatchFormer − plain, pretrained "
             "| BatchFormer − plain, random init |",
             "|---|---|---|---|"]
    for f in fractions:
        gain = paired(records, f, {"start": "pretrained", "bf": False}, {"start": "random-init", "bf": False})
        bf_gains = [paired(records, f, {"start": s, "bf": True}, {"start": s, "bf": False}) for s in STARTS]
        text.append(f"| {labels(f)} | {signed(gain)} | " + " | ".join(signed(g) for g in bf_gains) + " |")
    text += ["", "## Every fine-tuning run", "",
             "| labels | start | BatchFormer | seed | recipe | lr | steps | epochs | top-1 | best top-1 | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        text.append(f"| {labels(r['fraction'])} | {r['start']} | {'yes' if r['bf'] else 'no'} | {r['seed']} | "
                    f"{r['recipe']} | {r['lr']:.4g} | {r['steps']} | {r['epochs']:.1f} | {r['top1']:.2f} | "
                    f"{r['best_top1']:.2f} | {r['wall_s'] / 60:.1f} |")
    text += ["", "![top-1 against the label fraction](downstream.svg)", ""]
    return "\n".join(text)


def svg(info: dict, quick: list[dict], records: list[dict]) -> str:
    """Top-1 against the label fraction on a log axis: one line per start and method."""
    fractions = sorted(info["fractions"])
    lines = []
    for key, _, colour in METHODS:
        for start in STARTS:
            points = [(f, statistics.mean(v)) for f in fractions if (v := scores(quick, records, start, f)[key])]
            lines.append((points, colour, DASH[start]))
    legend = [(label, colour, "") for _, label, colour in METHODS] + [(start, "#444", DASH[start]) for start in STARTS]
    return line_plot("Top-1 against the fraction of labels (" + info["hardware"]["cpu"] + ")", fractions, labels,
                     "labelled images (log scale)", "top-1 on val (%)", lines, legend)


def line_plot(title: str, xs: list[float], tick_label, x_label: str, y_label: str, lines: list, legend: list,
              width: int = 760, height: int = 470, plot_width: int = 460) -> str:
    """An SVG line plot, written by hand (no plotting package): y in 0-100 %, x on a log axis with a
    tick at each of xs (labelled tick_label(x)); lines [(points [(x, y)], colour, dash)], an empty
    one skipped; legend [(label, colour, dash)] right of the plot. bench/downstream.py's and
    bench/longtail.py's plots."""
    left, top, w, h = 60, 40, plot_width, 360
    xs = sorted(xs)
    lo, hi = math.log10(xs[0]), math.log10(xs[-1])
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    sx = lambda f: left + w * (math.log10(f) - lo) / (hi - lo)
    sy = lambda v: top + h * (1 - v / 100)
    out = [f'<text x="{width / 2}" y="20" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#444"/>']
    for v in range(0, 101, 10):
        out += [f'<line x1="{left}" y1="{sy(v):.1f}" x2="{left + w}" y2="{sy(v):.1f}" stroke="#ddd"/>',
                f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>']
    for f in xs:
        out += [f'<line x1="{sx(f):.1f}" y1="{top}" x2="{sx(f):.1f}" y2="{top + h}" stroke="#ddd"/>',
                f'<text x="{sx(f):.1f}" y="{top + h + 16}" text-anchor="middle">{escape(tick_label(f))}</text>']
    out += [f'<text x="{left + w / 2}" y="{top + h + 36}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text x="16" y="{top + h / 2}" text-anchor="middle" transform="rotate(-90 16 {top + h / 2})">'
            f'{escape(y_label)}</text>']
    for points, colour, dash in lines:
        if not points:
            continue
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        coords = " ".join(f"{sx(f):.1f},{sy(v):.1f}" for f, v in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dashed}/>')
        out += [f'<circle cx="{sx(f):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"/>' for f, v in points]
    y = top + 10
    for label, colour, dash in legend:
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        out += [f'<line x1="{left + w + 20}" y1="{y}" x2="{left + w + 44}" y2="{y}" stroke="{colour}" '
                f'stroke-width="2"{dashed}/>', f'<text x="{left + w + 50}" y="{y + 4}">{escape(label)}</text>']
        y += 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
            '<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(out) + "\n</svg>\n")


def write_report(out: str, info: dict, quick: list[dict], records: list[dict]) -> str:
    """results.md, results.json and downstream.svg in out; returns the markdown."""
    text = markdown(info, quick, records)
    paired_diffs = {f"{f:g}": {"pretrained_minus_random": paired(records, f, {"start": "pretrained", "bf": False},
                                                                 {"start": "random-init", "bf": False}),
                               **{f"bf_minus_plain_{s}": paired(records, f, {"start": s, "bf": True},
                                                                {"start": s, "bf": False}) for s in STARTS}}
                    for f in info["fractions"]}
    write_results(out, text, {**info, "quick": quick, "finetune": records, "paired_top1_differences": paired_diffs})
    with open(os.path.join(out, "downstream.svg"), "w") as f:
        f.write(svg(info, quick, records))
    return text


def write_sweep(out: str, info: dict, quick: list[dict], records: list[dict]) -> str:
    """sweep.md and sweep.json: fine-tuning top-1 of the pretrained start for each base lr."""
    fraction = records[0]["fraction"]
    lrs = sorted({r["base_lr"] for r in records})
    by_lr = {lr: [r for r in records if r["base_lr"] == lr] for lr in lrs}
    best = max(lrs, key=lambda lr: statistics.mean(r["top1"] for r in by_lr[lr]))
    text = [f"# Fine-tuning lr sweep: pretrained start, {labels(fraction)} of the labels", "",
            *provenance(info),
            f"- backbone: {info['pretrained']}; kNN top-1 of the subset: {quick[0]['knn_top1']:.2f}", "",
            "| base lr (per 256) | lr used | recipe | steps | top-1 (mean ± std over seeds) | per seed |",
            "|---|---|---|---|---|---|"]
    for lr in lrs:
        rs = by_lr[lr]
        text.append(f"| {lr:g}{' (best)' if lr == best else ''} | {rs[0]['lr']:.4g} | {rs[0]['recipe']} | "
                    f"{rs[0]['steps']} | {mean_std([r['top1'] for r in rs])} | "
                    f"{', '.join(format(r['top1'], '.2f') for r in rs)} |")
    text = "\n".join(text) + "\n"
    write_results(out, text, {**info, "quick": quick, "runs": records, "best_base_lr": best}, name="sweep")
    return text
