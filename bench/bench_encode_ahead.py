"""`encode()`, which launches each batch before it reads the last one and prepares the next window of rows
between launches (`embed_batches`, `windowed_batches`), against the loop it replaced: a window of 16 batches
prepared and sorted by length, then one batch at a time (`embed_prepared` per batch), from one run.
`--loop nova-embed`: the same for `nova embed`'s model stage in one process (`ModelWorker.embed`), against
its loop before (every record prepared, packed by token budget, then one pack at a time).
`--loop nova-embed-ray`: `nova embed`'s model actor on Ray (`ModelStage`, one call per 256 pickled records),
fed records tokenized by the load stage (`prepare_records`, done before the clock starts, as other processes
do it on Ray) against records it tokenizes itself, as it did before; with `--image-size`, rows of a caption and
a photo, which the load stage now resizes to the model's input size.

Both sides embed the same sentences in the same batches. With a forward on an asynchronous device (a GPU's,
or here the stand-in's: serve/stand_in.py, a fixed cost per batch spent by a device thread without the GIL),
one batch at a time leaves the device idle while the host prepares rows and collates and reads each batch;
the new loops do that host work while the forward before it runs. With the forward on this CPU (a launch
returns with its outputs) both do the same work, so that row shows what the loop itself costs.

It prints sentences/s per side (medians of alternating rounds), their ratio within each round (median and
range), and the stand-in device's busy share.

    .venv/bin/python bench/bench_encode_ahead.py
    .venv/bin/python bench/bench_encode_ahead.py --loop nova-embed
    .venv/bin/python bench/bench_encode_ahead.py --loop nova-embed-ray [--rows-per-call 64]
    .venv/bin/python bench/bench_encode_ahead.py --loop nova-embed-ray --image-size 2000x1500 --sentences 64
    .venv/bin/python bench/bench_encode_ahead.py --stand-in-ms 2 --batch-size 64
    python bench/bench_encode_ahead.py --model /tmp/nova-full --device cuda --cuda-graphs   # a GPU's own figure
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from nova.embed.ray_pipeline import ROWS_PER_MODEL_CALL  # noqa: E402 - after the path set-up


def encode(model, sentences: list[str], batch_size: int) -> None:
    model.encode(sentences, batch_size=batch_size, show_progress=False)


def encode_before(model, sentences: list[str], batch_size: int) -> None:
    """The loop `encode()` ran before: each window of 16 batches prepared and sorted, then each batch
    launched and read before the next, its vectors put in input order."""
    window, results = 16 * batch_size, [None] * len(sentences)
    for start in range(0, len(sentences), window):
        rows = [model.processor.prepare_item(text, index=start + i, fetch_urls=True)
                for i, text in enumerate(sentences[start : start + window])]
        rows.sort(key=lambda r: r.num_tokens)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            for row, vector in zip(chunk, model.embed_prepared(chunk), strict=True):
                assert not isinstance(vector, Exception), vector
                results[row.index] = vector


def _records(sentences: list[str]) -> list[dict]:
    return [{"position": i, "id": str(i), "item": {"text": text}} for i, text in enumerate(sentences)]


def nova_embed(model, sentences: list[str], batch_size: int) -> None:
    from nova.embed.stages import EmbedOptions, ModelWorker

    results = ModelWorker(None, EmbedOptions(max_batch_size=batch_size), model=model).embed(_records(sentences))
    assert all("vector" in result for result in results)


def nova_embed_before(model, sentences: list[str], batch_size: int) -> None:
    """The loop `nova embed`'s model stage ran before: every record of the call (a shard in one process)
    prepared, packed by token budget, then each pack launched and read before the next; each vector made an
    array and a result record, as the model stage does."""
    from nova.embed.stages import EmbedOptions, ModelWorker, pack_by_token_budget

    worker = ModelWorker(None, EmbedOptions(max_batch_size=batch_size), model=model)
    o, records = worker.options, _records(sentences)
    rows = [model.processor.prepare_item(r["item"], index=r["position"], max_pixels=o.max_pixels,
                                         max_length=o.max_length, prompt_set=o.prompt_set) for r in records]
    ids = {r["position"]: r["id"] for r in records}
    results = {}
    for pack in pack_by_token_budget(rows, o.max_batch_tokens, o.max_batch_size):
        for row, vector in zip(pack, model.embed_prepared(pack, o.multivector), strict=True):
            results[row.index] = {"position": row.index, "id": ids[row.index], "vector": worker._array(vector)}
    assert len(results) == len(sentences)


def photo(width: int, height: int):
    """A photo-like RGB image (smooth shading plus noise), decoded as `nova embed`'s load stage decodes files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shade = np.add.outer(np.linspace(0, 255, height), np.linspace(0, 255, width))[..., None] / 2
    return Image.fromarray((shade + rng.normal(0, 30, (height, width, 3))).clip(0, 255).astype(np.uint8))


@dataclass(frozen=True)
class RayCalls:
    """The batches Ray hands `nova embed`'s model actors, as `ModelStage` receives them (pickled records, 256 a
    call): as the load stage made them before (decoded, untokenized), and as it makes them now (`prepare_records`:
    text tokenized, images fitted to the model's input size)."""

    untokenized: list[dict]
    tokenized: list[dict]

    @classmethod
    def of(cls, model, sentences: list[str], args) -> RayCalls:
        from nova.embed.ray_pipeline import _pack
        from nova.embed.stages import EmbedOptions, prepare_records

        records = _records(sentences)
        if args.image_size:
            image = photo(*(int(side) for side in args.image_size.split("x")))
            records = [{**record, "item": {**record["item"], "image": image}} for record in records]
        rows_per_call = args.rows_per_call
        calls = [records[i : i + rows_per_call] for i in range(0, len(records), rows_per_call)]
        return cls([_pack(call, 0) for call in calls],
                   [_pack(prepare_records(call, model.processor, EmbedOptions()), 0) for call in calls])


def _model_actor(model, batches: list[dict], batch_size: int) -> None:
    from nova.embed.ray_pipeline import ModelStage, _unpack
    from nova.embed.stages import EmbedOptions

    stage = ModelStage({"model_ref": None, "options": EmbedOptions(max_batch_size=batch_size), "model": model})
    for batch in batches:
        assert all("vector" in record for record in _unpack(stage(batch))[1])


def nova_embed_ray(model, calls: RayCalls, batch_size: int) -> None:
    _model_actor(model, calls.tokenized, batch_size)


def nova_embed_ray_before(model, calls: RayCalls, batch_size: int) -> None:
    _model_actor(model, calls.untokenized, batch_size)


@dataclass(frozen=True)
class Loop:
    """One comparison: a loop and the one it replaced, run on the same input (`inputs(model, sentences, args)`)."""

    name: str
    before_name: str
    run: Callable
    before: Callable
    inputs: Callable[[Any, list[str], argparse.Namespace], Any] = lambda model, sentences, args: sentences


LOOPS = {
    "encode": Loop("encode()", "one at a time", encode, encode_before),
    "nova-embed": Loop("nova embed", "one at a time", nova_embed, nova_embed_before),
    "nova-embed-ray": Loop("tokenized by the load stage", "tokenized by the actor", nova_embed_ray,
                           nova_embed_ray_before, RayCalls.of),
}


def timed_rounds(model, sides: dict, sentences: list[str], batch_size: int, rounds: int,
                 inputs: Any) -> dict[str, list[float]]:
    """sentences/s of each side, the sides alternating within each round; plus the stand-in's busy share."""
    rates: dict[str, list[float]] = {key: [] for name in sides for key in (name, f"busy {name}")}
    for _ in range(rounds):
        for name, run in sides.items():
            busy = model.snapshot().busy_seconds if hasattr(model, "snapshot") else None
            started = time.perf_counter()
            run(model, inputs, batch_size)
            seconds = time.perf_counter() - started
            rates[name].append(len(sentences) / seconds)
            if busy is not None:
                rates[f"busy {name}"].append((model.snapshot().busy_seconds - busy) / seconds)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stand-in-ms", type=float, default=5.0,
                        help="the stand-in forward's cost per batch, ms (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=1024, help="sentences per side and round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads for the CPU forward (0: torch's default)")
    parser.add_argument("--model", default=None, help="model directory (default: the tiny checkpoint)")
    parser.add_argument("--device", default=None, help="where the model runs (default: its loading default)")
    parser.add_argument("--cuda-graphs", action="store_true", help="the model's forward replayed from CUDA graphs")
    parser.add_argument("--loop", choices=sorted(LOOPS), default="encode",
                        help="encode() or nova embed's model stage in one process (default: %(default)s)")
    parser.add_argument("--rows-per-call", type=int, default=ROWS_PER_MODEL_CALL,
                        help="nova-embed-ray: records per model call (default: nova embed's, %(default)s)")
    parser.add_argument("--image-size", default=None, metavar="WxH",
                        help="nova-embed-ray: every sentence a caption of one photo of this size, e.g. 2000x1500")
    args = parser.parse_args()
    import torch
    from bench_server import make_sentences

    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint
    from serve.stand_in import ForwardCost, StandInModel

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = load_model(args.model or ensure_tiny_checkpoint(), device=args.device)
    if args.cuda_graphs:
        model.configure_cuda_graphs(True, max_rows=args.batch_size)
    sentences = make_sentences(args.sentences, seed=0)
    forwards = {f"stand-in forward, {args.stand_in_ms:g} ms a batch, asynchronous":
                StandInModel(model, ForwardCost(args.stand_in_ms)),
                f"the model's forward on {model.device}{' (CUDA graphs)' if args.cuda_graphs else ''}": model}
    photos = f", each with a {args.image_size} photo" if args.image_size and args.loop == "nova-embed-ray" else ""
    print(f"{args.sentences} ~15-word sentences{photos}, batches of {args.batch_size}, {args.rounds} alternating rounds; "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    loop = LOOPS[args.loop]
    name, before = loop.name, loop.before_name
    sides = {before: loop.before, name: loop.run}
    inputs = loop.inputs(model, sentences, args)
    warm_up = loop.inputs(model, sentences[: 2 * args.batch_size], args)
    for label, forward in forwards.items():
        loop.before(forward, warm_up, args.batch_size)
        rates = timed_rounds(forward, sides, sentences, args.batch_size, args.rounds, inputs)
        new, old = statistics.median(rates[name]), statistics.median(rates[before])
        ratios = [a / b for a, b in zip(rates[name], rates[before], strict=True)]
        print(f"{label}: {before} {old:.0f} sentences/s, {name} {new:.0f} sentences/s (medians); "
              f"ratio per round {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")
        if rates[f"busy {name}"]:
            print(f"  device busy: {before} {statistics.median(rates[f'busy {before}']):.0%}, "
                  f"{name} {statistics.median(rates[f'busy {name}']):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
