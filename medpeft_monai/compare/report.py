"""The comparison report: ``report.html`` (one self-contained file, figures embedded), ``results.csv`` (one
row per run), ``summary.csv`` (mean +- sd per method and fraction) and ``report.json`` (all of it).

The recommendation names, for each training fraction, the method with the best mean test metric and says
whether its lead over the runner-up is beyond the fold spread: ``best - runner_up > max(sd_best, sd_runner_up)``
(the sample standard deviations over folds). With one fold there is no spread to judge and it says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from medpeft_monai.utils import write_csv_atomic, write_text_atomic

__all__ = ["recommend", "summarise", "write_report"]

RESULT_COLUMNS = ["method", "fraction", "fold", "n_train", "metric", "val_metric", "best_step", "steps",
                  "train_seconds", "inference_ms", "trainable_params", "adapter_bytes"]


def summarise(results: list[dict]) -> list[dict]:
    """Mean and sample sd of the test metric per (method, fraction), with the run figures averaged."""
    groups: dict = defaultdict(list)
    for r in results:
        groups[(r["method"], r["fraction"])].append(r)
    rows = []
    for (method, fraction), runs in sorted(groups.items()):
        vals = [r["metric"] for r in runs]
        per_class = [r["per_class"] for r in runs if r.get("per_class")]
        rows.append({
            "method": method, "fraction": fraction, "folds": len(runs), "n_train": runs[0]["n_train"],
            "mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_class": [float(np.nanmean([np.nan if p[c] is None else p[c] for p in per_class]))
                          for c in range(len(per_class[0]))] if per_class else [],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
            "inference_ms": _mean_or_none([r["inference_ms"] for r in runs]),
        })
    return rows


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def recommend(summary: list[dict]) -> list[dict]:
    """Best method per fraction and whether its lead is beyond the fold spread (see the module docstring)."""
    out = []
    for fraction in sorted({s["fraction"] for s in summary}):
        ranked = sorted((s for s in summary if s["fraction"] == fraction), key=lambda s: -s["mean"])
        best = ranked[0]
        rec = {"fraction": fraction, "best": best["method"], "mean": best["mean"], "sd": best["sd"],
               "runner_up": None, "beyond_spread": None}
        if len(ranked) > 1:
            second = ranked[1]
            gap = best["mean"] - second["mean"]
            rec.update(runner_up=second["method"], gap=gap)
            if best["folds"] < 2:
                rec["verdict"] = (f"{best['method']} leads {second['method']} by {gap:.3f} on one fold: run "
                                  "--folds 3 or more to judge the spread.")
            else:
                spread = max(best["sd"], second["sd"])
                rec["beyond_spread"] = gap > spread
                rec["verdict"] = (f"{best['method']} leads {second['method']} by {gap:.3f}, "
                                  + ("beyond" if gap > spread else "within")
                                  + f" the fold spread ({spread:.3f}, {best['folds']} folds).")
        else:
            rec["verdict"] = f"{best['method']} is the only method run."
        out.append(rec)
    return out


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _file_uri(path: Path) -> str | None:
    return _png_uri(path.read_bytes()) if path.is_file() else None


def _curves_png(summary: list[dict], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in sorted({s["method"] for s in summary}):
        pts = sorted((s["fraction"], s["mean"], s["sd"]) for s in summary if s["method"] == method)
        xs, ms, ss = zip(*pts)
        ax.errorbar([100 * x for x in xs], ms, yerr=ss, marker="o", capsize=3, label=method)
    if len({s["fraction"] for s in summary}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("training data (%)")
    ax.set_ylabel(f"test {metric} (mean ± sd over folds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f0f0f0}figure{display:inline-block;margin:0.5em}figcaption{font-size:12px;text-align:center}
.rec{background:#eef6ee;padding:0.6em 1em;border-left:4px solid #4a4}pre{background:#f6f6f6;padding:0.6em;
font-size:12px;overflow-x:auto}"""


def _html(sweep: dict, summary: list[dict], recs: list[dict], results: list[dict], out: Path) -> str:
    metric = "mean Dice" if sweep["task"] == "segmentation" else "accuracy"
    fractions = sorted({s["fraction"] for s in summary})
    methods = [m["name"] for m in sweep["methods"]]
    cell = {(s["method"], s["fraction"]): s for s in summary}
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medpeft_monai comparison: "
             f"{e(Path(sweep['settings']['datalist']).name)}</title><style>{CSS}</style></head><body>",
             f"<h1>Which method for this data?</h1><p>{e(sweep['task'])} on <code>{e(sweep['settings']['datalist'])}"
             f"</code> ({sweep['sections']['training']} training, {sweep['sections']['validation']} validation, "
             f"{sweep['sections']['test']} test images); backbone <code>{e(sweep['settings']['backbone'])}</code>, "
             f"weights <code>{e(str(sweep['settings']['weights']))}</code>; {sweep['steps']} optimiser steps of "
             f"batch {sweep['settings']['batch_size']} per run for every method.</p>",
             "<h2>Recommendation</h2><div class='rec'><ul>"]
    for r in recs:
        parts.append(f"<li><b>{100 * r['fraction']:g} % of the training data</b>: <b>{e(r['best'])}</b> "
                     f"({r['mean']:.3f} ± {r['sd']:.3f}). {e(r['verdict'])}</li>")
    parts.append("</ul></div>")
    parts.append(f"<h2>Test {metric} per training fraction</h2>")
    parts.append(f"<img alt='test {metric} against training fraction' src='{_png_uri(_curves_png(summary, metric))}'>")
    header = ["method"] + [f"{100 * f:g} %" for f in fractions]
    rows = [[e(m)] + [f"{cell[(m, f)]['mean']:.3f} ± {cell[(m, f)]['sd']:.3f}" if (m, f) in cell else ""
                      for f in fractions] for m in methods]
    rows.append(["training images"] + [str(next((s["n_train"] for s in summary if s["fraction"] == f), ""))
                                       for f in fractions])
    parts.append(_table(header, rows))
    top = max(fractions)
    per_class = [(m, cell[(m, top)]["per_class"]) for m in methods if (m, top) in cell and cell[(m, top)]["per_class"]]
    if per_class and sweep["task"] == "segmentation":
        parts.append(f"<h3>Per-class Dice at {100 * top:g} %</h3>")
        parts.append(_table(["method"] + [f"class {c + 1}" for c in range(len(per_class[0][1]))],
                            [[e(m)] + [f"{v:.3f}" for v in pc] for m, pc in per_class]))
    parts.append("<h2>Cost per method</h2>")
    by_method: dict = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    cost_rows = []
    for m in sweep["methods"]:
        runs = by_method.get(m["name"], [])
        if not runs:
            continue
        reuse = runs[0]["prefix_reuse"]
        reuse_text = (f"blocks 0–{reuse['start_block'] - 1} of {reuse['blocks']} computed once per image"
                      if reuse["start_block"] else f"none: {reuse['reason']}")
        cost_rows.append([e(m["name"]), f"{runs[0]['trainable_params']:,}", _kib(runs[0]["adapter_bytes"]),
                          f"{statistics.fmean(r['train_seconds'] for r in runs):.1f}",
                          _fmt(_mean_or_none([r["inference_ms"] for r in runs])),
                          f"{m['adapter_lr']:g} / {m['head_lr']:g}", f"<code>{e(json.dumps(m['peft']))}</code>",
                          e(reuse_text)])
    parts.append(_table(["method", "trainable parameters", "adapter file", "train time per run (s)",
                         "inference per image (ms)", "learning rate adapter / head", "settings",
                         "frozen-prefix reuse"], cost_rows))
    if sweep["settings"].get("augment"):
        parts.append("<p>Augmentation was on: the input changes every step, so no run reused frozen-prefix "
                     "activations.</p>")
    if sweep["skipped_methods"]:
        parts.append("<p>Not run (do not apply to this backbone): " + "; ".join(
            f"<b>{e(k)}</b>: {e(v)}" for k, v in sweep["skipped_methods"].items()) + "</p>")
    figures = [(r, out / "runs" / r["method"] / f"f{r['fraction']:g}_fold{r['fold']}") for r in results
               if r.get("cases") is not None]
    if figures:
        parts.append(f"<h2>Sample predictions ({100 * top:g} %, fold 0)</h2><p>Best and worst test case of each "
                     "method; segmentation: prediction filled in red, label outlined in green.</p>")
        for r, d in figures:
            uri = _file_uri(d / "predictions.png")
            if uri:
                parts.append(f"<figure><img alt='predictions of {e(r['method'])}' src='{uri}'>"
                             f"<figcaption>{e(r['method'])}</figcaption></figure>")
        erfs = [(r, _file_uri(d / "erf.png")) for r, d in figures]
        erfs = [(r, u) for r, u in erfs if u]
        if erfs:
            parts.append("<h2>Effective receptive fields</h2><p>Gradient of the central unit of the last block "
                         "with respect to the input, on test images (<code>medpeft_monai.erf</code>).</p>")
            for r, uri in erfs:
                area = r.get("erf", {}).get("area>0.2")
                parts.append(f"<figure><img alt='ERF of {e(r['method'])}' src='{uri}' width='300'><figcaption>"
                             f"{e(r['method'])}" + (f": area &gt; 0.2 = {area:.3f}" if area is not None else "")
                             + "</figcaption></figure>")
    parts.append("<h2>Configuration</h2><pre>" + e(json.dumps({k: sweep[k] for k in (
        "settings", "methods", "steps", "device", "prefix_cache")}, indent=1, default=str)) + "</pre>")
    parts.append("<p>Files: <code>results.csv</code> (one row per run), <code>summary.csv</code>, "
                 "<code>report.json</code>, <code>runs/&lt;method&gt;/&lt;fraction&gt;_fold&lt;k&gt;/</code> "
                 "(result.json, adapter.pt).</p></body></html>")
    return "\n".join(parts)


def write_report(out: str | Path, sweep: dict, results: list[dict]) -> dict:
    """Write ``results.csv``, ``summary.csv``, ``report.json`` and ``report.html`` into ``out`` (each
    atomically) and return the report's data."""
    out = Path(out)
    order = {m["name"]: i for i, m in enumerate(sweep["methods"])}
    results = sorted(results, key=lambda r: (r["fraction"], order.get(r["method"], 99), r["fold"]))
    summary = summarise(results)
    recs = recommend(summary)
    write_csv_atomic(out / "results.csv", RESULT_COLUMNS, [[r[c] for c in RESULT_COLUMNS] for r in results])
    write_csv_atomic(out / "summary.csv", ["method", "fraction", "folds", "n_train", "mean", "sd", "train_seconds",
                                           "inference_ms"],
                     [[s[c] for c in ("method", "fraction", "folds", "n_train", "mean", "sd", "train_seconds",
                                      "inference_ms")] for s in summary])
    report = {**sweep, "summary": summary, "recommendation": recs, "results": results}
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "report.html", _html(sweep, summary, recs, results, out))
    return report
