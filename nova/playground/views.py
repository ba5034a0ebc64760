"""What the playground shows: ranking tables, heatmaps, the token view and the banner."""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .compare import Comparison, ScoringComparison, VariantResult  # noqa: E402
from .scoring import Match, movement_label, token_similarities  # noqa: E402

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
           "#469990", "#808000", "#000075", "#800000"]


def score_name(multivector: bool) -> str:
    return "MaxSim" if multivector else "cosine"


def variant_title(result: VariantResult, index: int) -> str:
    if index == 0:
        title = "### Baseline: no instructions"
    else:
        title = f"### {result.variant.name}"
    lines = [title]
    if result.variant.instructions:
        lines.append(f"*Instructions:* {html.escape(result.variant.instructions)}")
    lines.append(f"*Adapter:* `{result.adapter}`")
    return "\n\n".join(lines)


def ranking_html(comparison: Comparison, index: int) -> str:
    """Ranked candidates with scores and rank movement; data-* attributes carry full precision."""
    result = comparison.results[index]
    name = score_name(comparison.settings.multivector)
    order = sorted(range(len(result.scores)), key=lambda i: result.ranks[i])
    rows = []
    for i in order:
        candidate = comparison.candidates[i]
        delta = result.movement[i]
        cls = "up" if delta > 0 else "down" if delta < 0 else "same"
        move = "—" if index == 0 else movement_label(delta)
        rows.append(
            f'<tr class="nova-row" data-candidate="{candidate.label}" data-rank="{result.ranks[i]}" '
            f'data-score="{result.scores[i]:.9g}" data-movement="{delta}">'
            f'<td class="nova-rank">{result.ranks[i]}</td>'
            f'<td class="nova-move nova-{cls}">{move}</td>'
            f'<td class="nova-score">{result.scores[i]:.4f}</td>'
            f'<td class="nova-cand" title="{html.escape(candidate.preview)}"><b>{candidate.label}</b> '
            f"{html.escape(_clip(candidate.preview, 48))}</td></tr>"
        )
    return (
        f'<table class="nova-ranking" data-variant="{index}" data-metric="{name}">'
        f'<thead><tr><th>#</th><th title="rank movement against the baseline">move</th><th>{name}</th>'
        f"<th>candidate</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def scorings_html(comparison: ScoringComparison) -> str:
    """Each candidate's rank and score by pooled cosine and by late interaction (MaxSim) side by side, in
    MaxSim's order; "move" is the rank gained by MaxSim over cosine. MaxSim ÷ n_q puts MaxSim on cosine's
    [-1, 1] scale (the same order)."""
    n_q = comparison.query_tokens
    late, pooled = comparison.maxsim, comparison.cosine
    rows = []
    for i in sorted(range(len(comparison.candidates)), key=lambda i: late.ranks[i]):
        candidate, delta = comparison.candidates[i], comparison.movement[i]
        cls = "up" if delta > 0 else "down" if delta < 0 else "same"
        rows.append(
            f'<tr class="nova-row" data-candidate="{candidate.label}" data-maxsim-rank="{late.ranks[i]}" '
            f'data-maxsim="{late.scores[i]:.9g}" data-cosine-rank="{pooled.ranks[i]}" '
            f'data-cosine="{pooled.scores[i]:.9g}" data-movement="{delta}">'
            f'<td class="nova-cand" title="{html.escape(candidate.preview)}"><b>{candidate.label}</b> '
            f"{html.escape(_clip(candidate.preview, 48))}</td>"
            f'<td class="nova-rank">{pooled.ranks[i]}</td><td class="nova-score">{pooled.scores[i]:.4f}</td>'
            f'<td class="nova-rank">{late.ranks[i]}</td><td class="nova-score">{late.scores[i]:.4f}</td>'
            f'<td class="nova-score">{late.scores[i] / n_q:.4f}</td>'
            f'<td class="nova-move nova-{cls}">{movement_label(delta)}</td></tr>'
        )
    agree = sum(d == 0 for d in comparison.movement)
    top = "the same" if pooled.ranks.index(1) == late.ranks.index(1) else "a different"
    return (
        f'<p class="nova-scorings-summary">MaxSim puts {top} candidate first; {agree} of '
        f"{len(comparison.candidates)} candidates keep their rank. The query has n_q = {n_q} multi-vector "
        f"rows: MaxSim lies in [-{n_q}, {n_q}], cosine in [-1, 1].</p>"
        f'<table class="nova-ranking nova-scorings" data-query-tokens="{n_q}">'
        f"<thead><tr><th>candidate</th><th>#</th><th>pooled cosine</th><th>#</th><th>MaxSim</th>"
        f'<th>MaxSim ÷ n_q</th><th title="ranks gained by MaxSim over cosine">move</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short(label: str, width: int = 14) -> str:
    label = label.replace("\n", "⏎") if label.strip() else (label.replace("\n", "⏎").replace(" ", "·") or "∅")
    return label if len(label) <= width else label[: width - 1] + "…"


def heatmap_figure(comparison: Comparison, index: int, query_labels: list[str] | None = None,
                   limits: tuple[float, float] | None = None) -> Figure:
    """Query×candidate similarity. Pooled: one row (the query). Multi-vector: one row per query
    token, each cell the token's best match in that candidate; a column's sum is the MaxSim score."""
    result = comparison.results[index]
    labels = [c.label for c in comparison.candidates]
    if comparison.settings.multivector:
        matrix = np.stack([token_similarities(result.query_vector, c).max(axis=1) for c in result.candidate_vectors], axis=1)
        rows = query_labels or [f"q{i}" for i in range(matrix.shape[0])]
        rows = [_short(r) for r in rows]
    else:
        matrix = np.asarray([result.scores], dtype=np.float64)
        rows = ["query"]
    n_rows, n_cols = matrix.shape
    height = min(1.4 + 0.28 * n_rows, 9.0) if comparison.settings.multivector else 2.2
    fig = Figure(figsize=(max(4.0, 0.55 * n_cols + 2.0), height), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    vmin, vmax = limits if limits else (float(matrix.min()), float(matrix.max()))
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 1e-3, vmax + 1e-3
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n_cols), labels)
    ax.set_yticks(range(n_rows), rows, fontsize=7 if n_rows > 12 else 9)
    ax.set_xlabel("candidates")
    if n_rows * n_cols <= 60:
        for r in range(n_rows):
            for c in range(n_cols):
                value = matrix[r, c]
                color = "black" if value > vmin + 0.6 * (vmax - vmin) else "white"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    metric = "best candidate token per query token" if comparison.settings.multivector else "cosine"
    ax.set_title(f"{'Baseline' if index == 0 else result.variant.name}: {metric}", fontsize=9)
    if comparison.settings.multivector:
        ax.set_xlabel("candidates (column sum = MaxSim)")
    fig.colorbar(image, ax=ax, shrink=0.9)
    return fig


def shared_limits(comparison: Comparison) -> tuple[float, float] | None:
    """One colour scale for every variant's heatmap, so that shifts are visible across panels."""
    if comparison.settings.multivector:
        values = [token_similarities(r.query_vector, c).max(axis=1) for r in comparison.results for c in r.candidate_vectors]
        flat = np.concatenate(values)
    else:
        flat = np.asarray([s for r in comparison.results for s in r.scores])
    return float(flat.min()), float(flat.max())


def _token_span(text: str, style: str = "", title: str = "", cls: str = "nova-tok") -> str:
    shown = html.escape(text).replace("\n", "⏎<br>")
    return f'<span class="{cls}" style="{style}" title="{html.escape(title)}">{shown}</span>'


IMAGE_PAD = "<|image_pad|>"


def _pad_run(labels: list[str]) -> tuple[int, int] | None:
    """[start, end) of the longest run of image placeholder tokens (the image's merged patches)."""
    best, start = None, None
    for j, label in enumerate([*labels, ""]):
        if label == IMAGE_PAD and start is None:
            start = j
        elif label != IMAGE_PAD and start is not None:
            if best is None or j - start > best[1] - best[0]:
                best = (start, j)
            start = None
    return best


def _grid_shape(n: int, aspect: float) -> tuple[int, int]:
    """rows × cols == n closest to the image's width/height ratio (the processor keeps the aspect)."""
    pairs = [(r, n // r) for r in range(1, n + 1) if n % r == 0]
    return min(pairs, key=lambda rc: abs(np.log((rc[1] / rc[0]) / aspect)))


def _thumbnail(image_bytes: bytes, size: int = 360) -> tuple[str, int, int]:
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), img.width, img.height


def _patch_grid(matched: dict[int, list[Match]], query_labels: list[str], run: tuple[int, int],
                image_bytes: bytes) -> str:
    """The image with its patch grid on top; patches some query token matched best are tinted."""
    url, width, height = _thumbnail(image_bytes)
    rows, cols = _grid_shape(run[1] - run[0], width / height)
    cells = []
    for j in range(run[0], run[1]):
        hits = matched.get(j)
        if not hits:
            cells.append('<div class="nova-patch"></div>')
            continue
        best = max(hits, key=lambda m: m.similarity)
        color = PALETTE[best.query_index % len(PALETTE)]
        title = ", ".join(f"q{m.query_index} {query_labels[m.query_index]!r} ({m.similarity:.3f})" for m in hits)
        cells.append(f'<div class="nova-patch nova-hit" title="patch {j - run[0]}: {html.escape(title)}" '
                     f'style="background:{color}66;outline:2px solid {color}">'
                     f'<span style="color:{color}">{",".join(str(m.query_index) for m in hits)}</span></div>')
    return (
        f'<div class="nova-patches" style="width:{width}px;height:{height}px;background-image:url({url})">'
        f'<div style="grid-template-columns:repeat({cols},1fr);grid-template-rows:repeat({rows},1fr)">'
        f'{"".join(cells)}</div></div>'
    )


def token_view_html(query_labels: list[str], candidate_labels: list[str], matches: list[Match],
                    candidate_name: str, score: float, image_bytes: bytes | None = None) -> str:
    """Query tokens in colour; each candidate token that some query token matched best carries that
    colour (the strongest match wins) and the query token numbers as a superscript. An image's
    patches are drawn as a grid over the image."""
    matched: dict[int, list[Match]] = {}
    for m in matches:
        matched.setdefault(m.candidate_index, []).append(m)
    query_html = []
    for m, label in zip(matches, query_labels, strict=True):
        color = PALETTE[m.query_index % len(PALETTE)]
        target = candidate_labels[m.candidate_index]
        query_html.append(
            _token_span(label, f"border-bottom:3px solid {color}",
                        f"q{m.query_index} → {target!r} (#{m.candidate_index}, {m.similarity:.3f})")
            + f'<sub style="color:{color}">{m.query_index}</sub>'
        )
    run = _pad_run(candidate_labels) if image_bytes is not None else None
    cand_html = []
    for j, label in enumerate(candidate_labels):
        if run and run[0] <= j < run[1]:
            if j == run[0]:
                try:
                    cand_html.append(_patch_grid(matched, query_labels, run, image_bytes))
                except Exception:  # noqa: BLE001 - an undrawable image falls back to plain tokens
                    run = None
                else:
                    continue
            else:
                continue
        hits = matched.get(j)
        if not hits:
            cand_html.append(_token_span(label, "opacity:0.55"))
            continue
        best = max(hits, key=lambda m: m.similarity)
        color = PALETTE[best.query_index % len(PALETTE)]
        title = ", ".join(f"q{m.query_index} {query_labels[m.query_index]!r} ({m.similarity:.3f})" for m in hits)
        cand_html.append(
            _token_span(label, f"background:{color}33;border-bottom:3px solid {color}", title, "nova-tok nova-hit")
            + f'<sup style="color:{color}">{",".join(str(m.query_index) for m in hits)}</sup>'
        )
    rows = "".join(
        f'<tr class="nova-match" data-q="{m.query_index}" data-c="{m.candidate_index}" data-sim="{m.similarity:.9g}">'
        f'<td style="color:{PALETTE[m.query_index % len(PALETTE)]}">{m.query_index}</td>'
        f"<td><code>{html.escape(repr(query_labels[m.query_index]))}</code></td>"
        f"<td><code>{html.escape(repr(candidate_labels[m.candidate_index]))}</code> (#{m.candidate_index})</td>"
        f"<td>{m.similarity:.4f}</td></tr>"
        for m in matches
    )
    return (
        f'<div class="nova-tokens" data-maxsim="{score:.9g}">'
        f"<p><b>Query tokens</b> (colour = query token; hover for its best match)</p>"
        f'<div class="nova-text">{"".join(query_html)}</div>'
        f"<p><b>{html.escape(candidate_name)}</b>: candidate tokens (image patches) matched best by some query "
        f"token are highlighted; the numbers name the query tokens. MaxSim = {score:.4f}</p>"
        f'<div class="nova-text">{"".join(cand_html)}</div>'
        f'<details><summary>Per query token</summary><table class="nova-matches">'
        f"<tr><th>q</th><th>query token</th><th>best candidate token</th><th>cosine</th></tr>{rows}</table></details>"
        f"</div>"
    )


def adapter_loading_note(backend) -> str:
    """Whether visitors may load adapters, and from where (off unless the operator allowed it)."""
    root = getattr(backend, "adapter_root", None)
    if not backend.can_load_adapters:
        how = ("the playground has no admin key for the server (--admin-api-key)" if hasattr(backend, "url")
               else "start the playground with --adapter-root DIR to allow PEFT folders under DIR")
        return f"Loading adapters at run time is **off**: {how}."
    where = f"`{root}`" if root else "the server's `--lora-root`"
    return (f"PEFT folders under {where} only. Adapters loaded here can be unloaded here "
            "(type the name, *Unload adapter*).")


def banner_markdown(label: str, random_weights: bool, server: bool, error: str | None = None) -> str:
    where = "a `nova serve` server" if server else "this process"
    text = f"**Model:** `{label}` — embeddings computed by {where}."
    if random_weights:
        text = (
            '<div class="nova-random-banner">⚠️ <b>Random weights.</b> This is the tiny random-weight test '
            "checkpoint: rankings and scores are meaningless and only show that the pipeline works. Start the "
            "playground with a real model (<code>nova playground jinaai/jina-embeddings-v4</code>) to see "
            "what instructions do.</div>\n\n" + text
        )
    if error:
        text += f"\n\n⚠️ {error}"
    return text


CSS = """
.nova-random-banner {background:#fff3cd;border:2px solid #e0a800;color:#5c4400;padding:10px 14px;border-radius:8px;font-size:1.05em}
.nova-ranking {width:100%;border-collapse:collapse;font-size:0.85em;table-layout:auto}
.nova-ranking th, .nova-ranking td {padding:3px 5px;border:none;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.nova-ranking td.nova-rank, .nova-ranking td.nova-move, .nova-ranking td.nova-score {white-space:nowrap;width:1%}
.nova-up {color:#11803a;font-weight:bold} .nova-down {color:#c0392b;font-weight:bold} .nova-same {color:#888}
.nova-score {font-family:monospace}
.nova-text {font-family:monospace;line-height:2.1;white-space:normal;word-break:break-word}
.nova-tok {padding:1px 0;margin-right:1px}
#nova-status {min-height:1.5em}
.nova-patches {position:relative;display:block;margin:6px 0;background-size:100% 100%;border:1px solid #999}
.nova-patches > div {position:absolute;inset:0;display:grid}
.nova-patch {font-size:9px;line-height:1;overflow:hidden;outline:1px solid #ffffff55} .nova-patch span {background:#fffc;font-weight:bold}
"""
