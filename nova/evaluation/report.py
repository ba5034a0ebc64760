"""Outputs of `nova eval`: a table on stdout, results.json, runs/<variant>.trec and plot.png."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from .runner import VariantResult, write_trec


def deltas(results: list[VariantResult], baseline: str) -> dict[str, dict[str, float]]:
    base = next(r for r in results if r.variant.name == baseline).metrics
    return {r.variant.name: {m: r.metrics[m] - base[m] for m in r.metrics} for r in results}


def table(results: list[VariantResult], baseline: str, metrics: list[str]) -> str:
    """Fixed-width table: each metric's value and its change against the baseline."""
    change = deltas(results, baseline)
    name_width = max(len("variant"), *(len(r.variant.name) + (2 if r.variant.name == baseline else 0) for r in results))
    cell = 18
    lines = ["variant".ljust(name_width) + "".join(m.rjust(cell) for m in metrics)]
    lines.append("-" * len(lines[0]))
    for r in results:
        name = r.variant.name + (" *" if r.variant.name == baseline else "")
        cells = []
        for m in metrics:
            value = r.metrics[m]
            if r.variant.name == baseline:
                cells.append(f"{value:.4f}".rjust(cell))
            else:
                cells.append(f"{value:.4f} ({change[r.variant.name][m]:+.4f})".rjust(cell))
        lines.append(name.ljust(name_width) + "".join(cells))
    lines.append(f"* baseline; (±x) = change against '{baseline}'")
    return "\n".join(lines)


def results_document(results: list[VariantResult], baseline: str, metrics: list[str], dataset: dict,
                     model: dict, settings: dict, per_query: bool = False) -> dict:
    change = deltas(results, baseline)
    doc = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "model": model,
        "settings": settings,
        "metrics": metrics,
        "baseline": baseline,
        "results": {r.variant.name: r.metrics for r in results},
        "deltas": change,
        "variants": {r.variant.name: r.variant.to_dict() for r in results},
        "details": {
            r.variant.name: {"corpus_embeddings": r.corpus_embeddings, "seconds": round(r.seconds, 3),
                             "run_file": f"runs/{r.variant.name}.trec", **r.extra}
            for r in results
        },
    }
    if per_query:
        doc["per_query"] = {r.variant.name: r.per_query for r in results}
    return doc


def plot(results: list[VariantResult], baseline: str, metrics: list[str], path: Path, title: str) -> None:
    """Grouped bar chart: one group per metric, one bar per variant (the baseline first, hatched)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: r.variant.name != baseline)
    n = len(ordered)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 1.5 * len(metrics) + 0.18 * n * len(metrics))), 4.5), dpi=110)
    for i, r in enumerate(ordered):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(metrics))]
        values = [r.metrics[m] for m in metrics]
        bars = ax.bar(xs, values, width, label=r.variant.name, hatch="//" if r.variant.name == baseline else None,
                      edgecolor="black", linewidth=0.4)
        if n * len(metrics) <= 40:
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_ylim(0, min(1.05, max(0.05, max(r.metrics[m] for r in results for m in metrics) * 1.25)))
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out_dir: Path, results: list[VariantResult], baseline: str, metrics: list[str], dataset: dict,
                  model: dict, settings: dict, per_query: bool = False, make_plot: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:
        write_trec(out_dir / "runs" / f"{r.variant.name}.trec", r.run, r.variant.name)
    doc = results_document(results, baseline, metrics, dataset, model, settings, per_query)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    text = table(results, baseline, metrics)
    (out_dir / "results.txt").write_text(text + "\n", encoding="utf-8")
    if make_plot:
        title = f"{dataset.get('name')} ({dataset.get('split')}) - {model.get('model') or model.get('url')}"
        plot(results, baseline, metrics, out_dir / "plot.png", title)
    return doc
