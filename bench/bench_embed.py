"""`nova embed` benchmark: rows/s on Ray Data with 1 and 2 CPU model actors, against a plain in-process
`encode()` loop over the same corpus, from ONE run (these machines are noisy: only ratios measured together
mean something). One local Ray is started once (its start-up is not counted); each round runs the three
back to back (encode, 1 actor, 2 actors) and each ratio is computed inside a round; the medians are printed.

A `nova embed` figure is the whole command: planning, model actors starting (each loads the model), the
pipeline, Parquet writing and the commit of every shard. The `encode()` loop only embeds (model already
loaded, no input reading, no output), so it is the ceiling one process reaches.

CPU sharing: the `encode()` loop uses torch's default threads (all cores); each Ray actor reserves one CPU
and Ray caps its threads to it (OMP_NUM_THREADS=1), so 2 actors use the same cores as the loop.

    .venv/bin/python bench/bench_embed.py                     # 'small' random-weight config, 600 rows
    .venv/bin/python bench/bench_embed.py --rows 2000 --rounds 5 --model /path/to/model
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_corpus(path: Path, rows: int) -> list[dict]:
    items = []
    with path.open("w") as handle:
        for i in range(rows):
            text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + (i * 13) % 120))
            handle.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            items.append({"text": text})
    return items


def run_embed(corpus: Path, out: Path, model: str, extra: list[str]) -> float:
    from nova.cli import main

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        code = main(["embed", str(corpus), str(out), "--model", model, "--trust-remote-code", "--no-progress",
                     "--shard-rows", "200", *extra])
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"nova embed failed ({code}): {captured.getvalue()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="model directory (default: the 'small' random config)")
    parser.add_argument("--batch-size", type=int, default=16, help="encode() batch size (default: %(default)s)")
    args = parser.parse_args()

    import ray

    from nova.loading import load_model
    from nova.tiny import ensure_tiny_checkpoint

    model_dir = args.model or str(ensure_tiny_checkpoint(size="small"))
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    corpus = work / "corpus.jsonl"
    items = write_corpus(corpus, args.rows)
    model = load_model(model_dir, trust_remote_code=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(f"{args.rows} rows, model {model_dir}, {os.cpu_count()} CPUs, {args.rounds} rounds", flush=True)
    rates: dict[str, list[float]] = {"encode": [], "ray1": [], "ray2": []}
    ratios: dict[str, list[float]] = {"ray2/ray1": [], "ray1/encode": [], "ray2/encode": []}
    try:
        for round_ in range(args.rounds):
            started = time.perf_counter()
            model.encode(items, batch_size=args.batch_size, show_progress=False)
            encode = args.rows / (time.perf_counter() - started)
            ray1 = args.rows / run_embed(corpus, work / "out1", model_dir, ["--workers", "1"])
            ray2 = args.rows / run_embed(corpus, work / "out2", model_dir, ["--workers", "2"])
            for key, value in (("encode", encode), ("ray1", ray1), ("ray2", ray2)):
                rates[key].append(value)
            ratios["ray2/ray1"].append(ray2 / ray1)
            ratios["ray1/encode"].append(ray1 / encode)
            ratios["ray2/encode"].append(ray2 / encode)
            print(f"round {round_ + 1}: encode() {encode:.1f} rows/s, nova embed 1 actor {ray1:.1f} rows/s, "
                  f"2 actors {ray2:.1f} rows/s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("\nmedians over rounds:")
    for key, values in rates.items():
        print(f"  {key:12s} {statistics.median(values):8.1f} rows/s")
    for key, values in ratios.items():
        print(f"  {key:12s} {statistics.median(values):8.2f}x")


if __name__ == "__main__":
    main()
