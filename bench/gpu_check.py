"""One prepared, offline check of the model on a GPU (written for one H100 and about 15 minutes in all).

    python bench/gpu_check.py                          # on the GPU machine: all three parts, full-size shape
    python bench/gpu_check.py --device cpu --size tiny # smoke mode: the same code paths, on this CPU

Parts (each prints its figures; a failed check exits non-zero at the end, after everything has run):
  1. parity: the tiny checkpoint in bf16 against fp32 on the same device (pooled, multi-vector, mixed batch
     of text / image / text+image rows, three adapters and the base model): cosine >= 0.98.
  2. sdpa + padding: a padded mixed batch against each row alone, bf16 with sdpa (cosine >= 0.99), the
     instruction prefix cache against the uncached forward, two batches launched before either is read (the
     server's loop on a GPU) against each alone (cosine >= 0.99999), and flash-attention 2 against sdpa when
     flash_attn is installed.
  3. throughput of a given shape (`--size full`: config.json at the repository root, Jina V4's 3B shape) with
     random bf16 weights generated on the device, random rank-32 adapters: text bs=1 (P50 latency), text
     bs=32, images bs=8, one and three adapters bs=16, a 40-token instruction on short queries; eagerly,
     then with CUDA graphs (checked against eager first, cosine >= 0.9999; the instructed batch once through
     a prefix bucket and once with prefix buckets off, to decide which pays); printed next to the model
     card's A100 figures (15 ms P50 at bs=1, 400 req/s at bs=32) and against the GPU-forward targets.
  4. new batch shapes: a stream of 64 batches of shapes not run before, timed, then again; padded to a
     multiple of 16 (the CUDA default) and of 1.
  5. float16 and bfloat16 against float32 on the `--size` shape (random weights, the same in all three up to
     rounding, three random adapters): pooled cosine per row of the mixed batch (text, images, text+image,
     three adapters and the base model), target >= 0.999; a row that overflows float16 is named.

Needs only torch, transformers, safetensors, jinja2, Pillow and numpy (the model's remote-code imports);
nothing is downloaded. If one is missing the script says which before doing anything.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "safetensors", "jinja2", "PIL", "numpy")
MODEL_CARD_A100 = {"text bs=1 P50 ms": 15.0, "text bs=32 req/s": 400.0}
QUERIES = [
    "what is the capital of france and why did it become the seat of government",
    "how do i sort a list of dictionaries by a key in python without a lambda",
    "symptoms of vitamin d deficiency in adults who work night shifts indoors",
    "best hiking trails near lake tahoe for beginners with dogs in early spring",
    "difference between a roth ira and a traditional ira for self employed people",
    "why does my sourdough bread come out dense and flat after the second proof",
    "explain the proof that there are infinitely many prime numbers in simple terms",
    "how long does it take for concrete to cure before you can drive on it safely",
]
INSTRUCTION = ("Given a web search query from a user, retrieve the passages from the knowledge base that "
               "answer the question directly, preferring precise, recent and trustworthy sources over general overviews.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["tiny", "small", "full"], default="full",
                        help="shape for the throughput part (parity always uses the tiny checkpoint)")
    parser.add_argument("--rounds", type=int, default=None, help="timed repetitions per figure")
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "sdpa", "throughput", "shapes", "dtypes"])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"missing Python packages: {', '.join(missing)}; install them from wheels brought along "
              "(pip install --no-index --find-links WHEELS ...), nothing can be downloaded here")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    wanted = (5, 20)  # pyproject: transformers>=5.20 (the processor's image classes and cache argument)
    have = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if have < wanted:
        print(f"transformers {transformers.__version__} is older than the project's >= 5.20: install the wheels "
              "brought along first (pip install --no-index --find-links WHEELS transformers tokenizers "
              "huggingface_hub); continuing, expect failures")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"flash_attn {'installed' if importlib.util.find_spec('flash_attn') else 'not installed'}")
    rounds = args.rounds or (20 if device.type == "cuda" else 3)
    report: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}
    failures: list[str] = []
    parts = (("parity", parity), ("sdpa", sdpa_padding), ("throughput", throughput), ("shapes", new_shapes),
             ("dtypes", dtype_parity))
    for part, fn in parts:
        if part in args.skip:
            continue
        started = time.perf_counter()
        try:
            report[part] = fn(device, args, rounds, failures)
        except Exception as exc:  # keep going: one part failing must not hide the others' figures
            import traceback

            traceback.print_exc()
            failures.append(f"{part}: {type(exc).__name__}: {exc}")
        print(f"[{part}: {time.perf_counter() - started:.0f}s]", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    print("FAILED: " + "; ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


# ---- helpers ---------------------------------------------------------------------------------------------


def cos(a, b) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def image(width: int, height: int, seed: int):
    from PIL import Image

    img = Image.new("RGB", (width, height))
    img.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x + y) % 256)
                 for y in range(height) for x in range(width)])
    return img


def mixed_items() -> list:
    return [
        {"task": "retrieval.query", "text": QUERIES[0]},
        {"task": "retrieval.passage", "text": "Paris is the capital and largest city of France. " * 6},
        {"task": "code.query", "text": QUERIES[1], "instructions": "Find code"},
        {"task": "text-matching", "text": "the cat sat on the mat"},
        {"text": "no adapter here", "adapter": None},
        {"image": image(120, 80, 0)},
        {"image": image(60, 90, 3), "text": "a bar chart", "task": "retrieval.passage"},
        {"image": image(50, 50, 5), "instructions": "Represent this chart", "adapter": "code"},
    ]


def load_tiny(device, dtype, attn: str | None = None):
    from nova.repo import model_class
    from nova.tiny import ensure_tiny_checkpoint

    kwargs = {"device": str(device), "dtype": dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    return model_class().from_pretrained(str(ensure_tiny_checkpoint()), **kwargs)


def compare(name: str, got: list, want: list, floor: float, failures: list) -> dict:
    pooled = min(cos(a, b) for a, b in zip(got[0], want[0], strict=True))
    import torch

    multi = min(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())
                for a, b in zip(got[1], want[1], strict=True))
    ok = pooled >= floor and multi >= floor
    print(f"  {name}: min pooled cosine {pooled:.5f}, min mean multi-vector cosine {multi:.5f} "
          f"(floor {floor}) {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"{name}: cosine {min(pooled, multi):.4f} < {floor}")
    return {"pooled_min_cos": pooled, "multi_min_mean_cos": multi}


def both(model, items, batch_size):
    return (model.encode(items, batch_size=batch_size),
            model.encode(items, batch_size=batch_size, return_multivector=True))


# ---- 1. parity -------------------------------------------------------------------------------------------


def parity(device, args, rounds, failures) -> dict:
    import torch

    print("1. bf16 vs fp32 on the tiny checkpoint (mixed batch, three adapters + base)")
    items = mixed_items()
    fp32 = load_tiny(device, torch.float32, "sdpa")
    bf16 = load_tiny(device, torch.bfloat16)
    print(f"  bf16 attention: {bf16.config._attn_implementation}")
    out = {"load_bf16": compare("loaded in bf16", both(bf16, items, len(items)), both(fp32, items, len(items)),
                                0.98, failures)}
    moved = load_tiny(device, torch.float32, "sdpa").to(torch.bfloat16)
    moved.unload_adapter("code")
    moved.load_adapter("code", str(pathlib.Path(moved.lora.adapters["retrieval"].path).parent / "code"))
    out["moved_bf16"] = compare("fp32 moved to bf16, adapter loaded after", both(moved, items, len(items)),
                                both(fp32, items, len(items)), 0.98, failures)
    return out


# ---- 2. sdpa with padding --------------------------------------------------------------------------------


def sdpa_padding(device, args, rounds, failures) -> dict:
    import torch

    print("2. padded mixed batches vs each row alone (bf16)")
    items = mixed_items()
    out = {}
    sdpa = load_tiny(device, torch.bfloat16, "sdpa")
    alone = ([sdpa.encode([i])[0] for i in items], [sdpa.encode([i], return_multivector=True)[0] for i in items])
    out["sdpa"] = compare("sdpa, batch vs alone", both(sdpa, items, len(items)), alone, 0.99, failures)
    cached = both(sdpa, items, len(items))
    live, sdpa.prefix_cache = sdpa.prefix_cache, type(sdpa.prefix_cache)(0)
    out["prefix_cache"] = compare("instruction prefix cache vs uncached", cached, both(sdpa, items, len(items)),
                                  0.99, failures)
    sdpa.prefix_cache = live
    out["launched_back_to_back"] = back_to_back(sdpa, items, failures)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        flash = load_tiny(device, torch.bfloat16, "flash_attention_2")
        out["flash_attention_2"] = compare("flash-attention 2 vs sdpa", both(flash, items, len(items)),
                                           both(sdpa, items, len(items)), 0.99, failures)
    return out


def back_to_back(model, items, failures) -> dict:
    """Two batches launched before either is read (the server's loop on a GPU: vectors copied to pinned memory
    behind each forward, read after its event) against each run alone: the same vectors."""
    rows = [model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
    halves = [rows[: len(rows) // 2], rows[len(rows) // 2:]]
    pending = [model.launch_prepared(half, False, collated=model.collate_rows(half)) for half in halves]
    waiting = [not p.ready for p in pending]  # right after the launches: the device still ran them
    got = [v for p in pending for v in p.result()]
    want = [v for half in halves for v in model.embed_prepared(half)]
    worst = min(cos(a, b) for a, b in zip(got, want, strict=True))
    ok = worst >= 0.99999
    print(f"  launched back to back, then read, vs one at a time: min cosine {worst:.6f} (floor 0.99999); "
          f"still running right after launch: {waiting} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"launched back to back: cosine {worst:.5f}")
    return {"min_cos": worst, "running_after_launch": waiting,
            "device_seconds": [p.device_seconds() for p in pending]}


# ---- 3. throughput ---------------------------------------------------------------------------------------


def random_model(device, size: str, layers: int | None = None, dtype=None):
    """The shape's model with random weights made on the device (no host copy; `dtype`, by default bf16 on CUDA
    and fp32 elsewhere), three random adapters; the same weights on every call (fixed seeds). `layers`
    overrides the text depth of the small shapes (bench_ops.py: the full depth at the tiny width)."""
    import torch

    from nova.repo import model_class
    from nova.tiny import FULL, LORA_SHAPE, ensure_tiny_checkpoint, random_lora, tiny_config_dict

    config_cls = model_class("NovaEmbeddingsV1Config")
    if size == "full":
        if layers is not None:
            raise ValueError("layers overrides the depth of the tiny and small shapes only")
        config = config_cls.from_pretrained(str(REPO))
    else:
        config_dict = tiny_config_dict(size)
        if layers is not None:
            config_dict["text_config"]["num_hidden_layers"] = layers
        config = config_cls.from_dict(config_dict)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class()._from_config(config, dtype=dtype)
    model.eval()
    processor_cls = model_class("NovaEmbeddingsV1Processor")
    model.attach_processor(processor_cls.from_pretrained(str(ensure_tiny_checkpoint()), config=config))
    rank, scale = LORA_SHAPE[FULL]  # Jina V4's rank on every shape here
    generator = torch.Generator(device=device).manual_seed(1)
    for i, task in enumerate(("retrieval", "text-matching", "code")):
        pairs = random_lora(model, generator, i, rank, scale)
        model.lora.add([model.lora.build(task, {"r": rank, "lora_alpha": rank}, pairs)])
    model.record_absent_task_adapters(log=False)
    return model


def timed(fn, device, rounds: int, warmup: int = 2) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# The GPU-forward targets on the full shape, H100, bf16 (text bs=1 P50 ms, text bs=32 items/s, three adapters /
# one adapter at bs=16, 8 images ms, instructed / uninstructed throughput at bs=32)
TARGETS = {"text bs=1 P50 ms": 8.0, "text bs=32 items/s": 2500.0, "three / one adapter": 1.1,
           "images bs=8 ms": 80.0, "instructed / uninstructed": 0.95}


def throughput(device, args, rounds, failures) -> dict:
    """The cases eagerly, then (CUDA) with the text forward replayed through CUDA graphs: the eager path is what
    images and cached instruction prefixes always take; graphs serve text-only batches. On a CPU the graph
    pass runs the same bucket path without capture (a smoke check of the code, not a figure)."""
    import torch

    size = args.size
    print(f"3. throughput, {size} shape, random {'bf16' if device.type == 'cuda' else 'fp32'} weights on {device}")
    started = time.perf_counter()
    model = random_model(device, size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  built {n_params / 1e9:.2f} B parameters on the device in {time.perf_counter() - started:.1f}s")
    queries = [{"task": "retrieval.query", "text": QUERIES[i % len(QUERIES)]} for i in range(32)]
    tokens = [model.processor.prepare_item(q).num_tokens for q in queries]
    instruction_tokens = len(model.processor.instruction_ids(INSTRUCTION))
    print(f"  queries: {statistics.mean(tokens):.1f} tokens on average; instruction: {instruction_tokens} tokens")
    images = [{"image": image(448, 448, seed), "task": "retrieval.passage"} for seed in range(8)]
    adapters = ["retrieval", "text-matching", "code"]
    one = [dict(queries[i], adapter="retrieval") for i in range(16)]
    mixed = [dict(queries[i], adapter=adapters[i % 3]) for i in range(16)]
    instructed = [dict(q, instructions=INSTRUCTION) for q in queries]
    cases = [
        ("text bs=1", queries[:1]),
        ("text bs=32", queries),
        ("images bs=8", images),
        ("one adapter bs=16", one),
        ("three adapters bs=16", mixed),
        ("text bs=32 + 40-token instruction", instructed),
        ("same, naive (no prefix cache)", instructed),
        ("same, prefix cache, prefixes eager", instructed),  # graphs pass only: prefix buckets off
    ]
    results: dict = {}
    live = model.prefix_cache
    passes = ["eager", "cuda graphs"]
    for mode in passes:
        if mode == "cuda graphs":
            model.configure_cuda_graphs(True, capture=device.type == "cuda")
            for label, batch in (("text bs=32", queries), ("three adapters bs=16", mixed),
                                 ("text bs=32 + 40-token instruction", instructed)):
                got = both(model, batch, len(batch))
                model.cuda_graphs.enabled = False
                want = both(model, batch, len(batch))
                model.cuda_graphs.enabled = True
                compare(f"graphs vs eager, {label}", got, want, 0.9999, failures)
        results[mode] = figures = {}
        print(f"  -- {mode}")
        for label, batch in cases:
            if "prefixes eager" in label and mode == "eager":
                continue
            model.prefix_cache = type(live)(0) if "naive" in label else live
            model.cuda_graphs.prefixes = "prefixes eager" not in label  # no configure(): it drops the graphs
            times = timed(lambda batch=batch, model=model: model.encode(batch, batch_size=len(batch)), device, rounds)
            p50 = statistics.median(times)
            figures[label] = {"p50_ms": p50 * 1e3, "items_per_s": len(batch) / p50, "batch": len(batch)}
            print(f"  {label:36s} P50 {p50 * 1e3:8.1f} ms   {len(batch) / p50:8.1f} items/s")
        model.prefix_cache, model.cuda_graphs.prefixes = live, True
        base = figures["text bs=32"]["items_per_s"]
        instr = figures["text bs=32 + 40-token instruction"]["items_per_s"]
        naive = figures["same, naive (no prefix cache)"]["items_per_s"]
        mix = figures["three adapters bs=16"]["p50_ms"] / figures["one adapter bs=16"]["p50_ms"]
        print(f"  instruction / no instruction throughput: {instr / base:.2f}x (naive {naive / base:.2f}x); "
              f"three adapters / one adapter time at bs=16: {mix:.2f}x")
        if "same, prefix cache, prefixes eager" in figures:
            unbucketed = figures["same, prefix cache, prefixes eager"]["items_per_s"]
            print(f"  instructed batches through prefix buckets / eagerly: {instr / unbucketed:.2f}x "
                  f"(instructed / uninstructed with prefixes eager: {unbucketed / base:.2f}x)")
        measured = {"text bs=1 P50 ms": figures["text bs=1"]["p50_ms"], "text bs=32 items/s": base,
                    "three / one adapter": mix, "images bs=8 ms": figures["images bs=8"]["p50_ms"],
                    "instructed / uninstructed": instr / base}
        figures["targets"] = {}
        for name, target in TARGETS.items():
            higher = name in ("text bs=32 items/s", "instructed / uninstructed")
            met = measured[name] >= target if higher else measured[name] <= target
            figures["targets"][name] = {"measured": measured[name], "target": target, "met": met}
            print(f"  target {name}: {measured[name]:.2f} ({'>=' if higher else '<='} {target}) "
                  f"{'met' if met else 'NOT met'}")
    if device.type == "cuda":
        stats = model.cuda_graphs.stats
        print(f"  cuda graphs: {stats.captured} captured, {stats.replays} replays, {stats.eager} batches beyond "
              f"the buckets, {stats.memory_bytes / 2**20:.0f} MiB")
    print("  model card (A100): text bs=1 P50 15 ms; text bs=32 400 req/s")
    here = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for mode in passes:
        print(f"  here ({here}, {size} shape, {mode}): text bs=1 P50 {results[mode]['text bs=1']['p50_ms']:.1f} ms; "
              f"text bs=32 {results[mode]['text bs=32']['items_per_s']:.0f} req/s")
    results["model_card_a100"] = MODEL_CARD_A100
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def new_shapes(device, args, rounds, failures) -> dict:
    """A stream of batches whose shapes (rows x padded length) the model has not run, as a server meets them,
    then the same stream again: the difference is the one-time cost per new shape (kernel selection, memory
    growth), what a server's batch cost model must not learn as per-token cost (serve/cost_model.py). Run with
    batches padded to a multiple of 16 (the CUDA default), then of 1, each on its own stream of shapes."""
    import random

    print(f"4. new batch shapes, {args.size} shape on {device}")
    model = random_model(device, args.size)
    encode = model.encode
    encode([{"text": q} for q in QUERIES], batch_size=len(QUERIES))  # the first forward at all
    out = {}
    for multiple, seed in ((16, 1), (1, 2)):
        model.pad_to_multiple_of = multiple
        rng = random.Random(seed)
        words = " ".join(QUERIES).split()
        stream = [[{"task": "retrieval.query", "text": " ".join(rng.choices(words, k=rng.randint(4, 40)))}
                   for _ in range(rng.randint(1, 32))] for _ in range(64)]
        shapes = {(len(b), -(-max(model.processor.prepare_item(i).num_tokens for i in b) // multiple)) for b in stream}
        passes = [sum(timed(lambda b=b: encode(b, batch_size=len(b)), device, 1, warmup=0)[0] for b in stream)
                  for _ in range(2)]
        out[f"multiple {multiple}"] = {"batches": len(stream), "shapes": len(shapes), "first_pass_ms": passes[0] * 1e3,
                                       "second_pass_ms": passes[1] * 1e3}
        print(f"  padded to a multiple of {multiple:2d}: {len(stream)} batches ({len(shapes)} shapes): first pass "
              f"{passes[0] * 1e3:.0f} ms, the same batches again {passes[1] * 1e3:.0f} ms "
              f"({passes[0] / passes[1]:.2f}x)")
    return out


DTYPE_TARGET = 0.999  # pooled cosine to float32, every row of the mixed batch


def dtype_parity(device, args, rounds, failures) -> dict:
    """The mixed batch in float16 and in bfloat16 against float32. Each model is built in float32 from the same
    seeds and then cast (as `.half()` or `.to(torch.bfloat16)` would), so the three differ by rounding only.
    Rows run through `embed_prepared`, so a row that overflows float16 is reported by name and the other rows
    still count."""
    import torch

    print(f"5. float16 and bfloat16 against float32, {args.size} shape, random weights on {device} "
          "(mixed batch: text, images, three adapters + base)")
    items = mixed_items()

    def pooled(model) -> list:
        rows = [model.processor.prepare_item(item, index=i) for i, item in enumerate(items)]
        return model.embed_prepared(rows)

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # an exact fp32 reference
    try:
        want = pooled(random_model(device, args.size, dtype=torch.float32))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if any(isinstance(w, Exception) for w in want):
        raise RuntimeError(f"the float32 reference itself failed: {[str(w) for w in want if isinstance(w, Exception)]}")
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        gc.collect()  # the previous model (its processor holds a closure over it: a reference cycle)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        name = str(dtype).removeprefix("torch.")
        got = pooled(random_model(device, args.size, dtype=torch.float32).to(dtype))
        errors = [str(o) for o in got if isinstance(o, Exception)]
        cosines = [cos(g, w) for g, w in zip(got, want, strict=True) if not isinstance(g, Exception)]
        worst = min(cosines) if cosines else float("nan")
        ok = not errors and worst >= DTYPE_TARGET
        print(f"  {name}: min pooled cosine to float32 {worst:.5f} over {len(cosines)} rows, per row "
              f"{' '.join(f'{c:.5f}' for c in cosines)} (target {DTYPE_TARGET}) {'ok' if ok else 'FAIL'}")
        for error in errors:
            print(f"  {name}: {error}")
        if not ok:
            failures.append(f"{name} vs float32: min pooled cosine {worst:.5f}, {len(errors)} row error(s)")
        out[name] = {"pooled_min_cos": worst, "pooled_cos": cosines, "row_errors": errors}
    return out


if __name__ == "__main__":
    sys.exit(main())
