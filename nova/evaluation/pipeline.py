"""nova eval's pipeline as a library, apart from its command line: load a model in process, evaluate variants
on a dataset and write the outputs. `nova eval` and `nova train`'s held-out evaluation both call it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserInputError


def load_in_process(model_spec: str | None, device: str | None, adapters: list[tuple[str, str]], dtype=None):
    from nova.loading import load_model

    if model_spec:
        model_spec = os.path.expanduser(model_spec)
    try:
        model = load_model(model_spec, device=device, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load model {model_spec or '(tiny)'}: {str(exc).splitlines()[0]}") from None
    for name, path in adapters:
        try:
            model.load_adapter(name, path)
        except ValueError as exc:
            raise UserInputError(f"--load-adapter {name}={path}: {exc}") from None
    return model


def evaluate_variants(dataset, variants, baseline, embedder, out_dir: Path, *, metrics=None, top_k=1000,
                      cache_dir=None, use_cache=True, ignore_identical_ids=True, per_query=False, make_plot=True,
                      log=print) -> dict:
    """Library entry point (also used by `nova train` for its held-out evaluation)."""
    from . import metrics as metrics_mod
    from .cache import EmbeddingCache
    from .report import table, write_outputs
    from .runner import Evaluator

    names = metrics_mod.metric_list(metrics)
    cache = EmbeddingCache(cache_dir, enabled=use_cache)
    evaluator = Evaluator(dataset, embedder, cache, names, top_k=top_k, ignore_identical_ids=ignore_identical_ids, log=log)
    results = evaluator.run(variants)
    settings = {"top_k": evaluator.top_k, "ignore_identical_ids": ignore_identical_ids,
                "corpus_embeddings_computed": evaluator.corpus_embeddings_computed,
                "cache_dir": str(cache.root) if use_cache else None}
    doc = write_outputs(out_dir, results, baseline, names, dataset.describe(), embedder.describe(), settings,
                        per_query=per_query, make_plot=make_plot)
    log("")
    log(table(results, baseline, names))
    log(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'runs'}/" + ("" if not make_plot else f", {out_dir / 'plot.png'}"))
    return doc
