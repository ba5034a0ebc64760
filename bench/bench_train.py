"""What a large contrastive batch costs in `nova train`: peak memory and time per triplet of a batch of 512
embedded 8 triplets at a time (GradCache), against a batch of 8 (what fits the same memory without the cache)
and against the same 512 embedded in one graph (the uncached path).

    python bench/bench_train.py                          # tiny checkpoint, CPU, passages of about 100 tokens
    python bench/bench_train.py --passage-words 0        # the synthetic task's own 5-word passages
    python bench/bench_train.py --batch 1024 --mini 32 --model MODEL_DIR --device cuda --precision bf16 \
        --rank 32 --hard-negatives 0 --passage-words 100 --gradient-checkpointing   # PLAN=train bench/gpu_run.sh

Each case runs in a fresh process: `nova train`'s own Trainer (setup, then contrastive batches through
`accumulate_gradients` and an AdamW step): one warm-up batch of the small size, then the measured steps.
Memory, what the steps need on top of the loaded model:
- CUDA: torch.cuda.max_memory_allocated from the warm-up on minus torch.cuda.memory_allocated before it;
- CPU: the peak of the bytes torch's CPU tensors hold during the measured steps, replayed after the timed run
  under torch.profiler's memory events (the optimizer's state, allocated in the warm-up, is outside it in every
  case). Also printed: the growth of the process's resident set (Linux VmHWM from the warm-up on, reset
  through /proc/self/clear_refs, minus the resident set before), which adds what the C allocator keeps after
  tensors are freed: on the tiny checkpoint that outweighs the tensors.
Time: wall time of the measured steps (after the warm-up) divided by their triplets, with triplets/s and
tokens/s. Data: the synthetic task with 3-word queries (enough distinct triplets for the batch), 3 hard
negatives per triplet (`--hard-negatives`), passages lengthened to 100 words with filler words (about 100
tokens, as retrieval passages and the GPU measurement have; `--passage-words 0` keeps the task's 5 words, where
a step on the tiny checkpoint does almost nothing per item).

Targets: the cached batch of 512 within 10% of the batch of 8's memory, and its time per triplet
within 1.5x of the uncached path's at the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def cpu_tensor_peak_bytes(run) -> int:
    """The most bytes torch's CPU tensors held at once while `run()` ran, from torch.profiler's memory events: the
    CPU's counterpart of torch.cuda.max_memory_allocated. The resident set also counts what the C allocator keeps
    after tensors are freed, which on a small model outweighs the tensors themselves."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    held = [e["args"]["Total Allocated"] for e in events  # Device Type 0: the CPU (c10::DeviceType)
            if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max(held, default=0)


def run_case(args) -> dict:
    """One case in this process -> its measurements."""
    import torch

    from nova.training.data import BatchOrder
    from nova.training.trainer import TrainConfig, Trainer

    config = TrainConfig(data=args.data, out=args.out, model=args.model, rank=args.rank, batch_size=args.case_batch,
                         mini_batch_size=args.case_mini, steps=10**6, progress=False, device=args.device,
                         precision=args.precision, lr=1e-4, gradient_checkpointing=args.gradient_checkpointing)
    trainer = Trainer(config, log=lambda message: None)
    trainer.start()
    trainer.setup()
    trainer.peft_model.train()
    cuda = trainer.inner.device.type == "cuda"

    def optimizer_step(index: int) -> tuple[int, int]:
        trainer.optimizer.zero_grad(set_to_none=True)
        report = trainer.accumulate_gradients(index)
        trainer.optimizer.step()
        return report.triplets, report.tokens

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _status_kib("VmRSS") * 1024
    measured_order = trainer.order
    trainer.order = BatchOrder(measured_order.count, args.warmup_batch, config.seed)
    optimizer_step(10**5)  # warm-up: allocator, lazy initializations
    trainer.order = measured_order
    started = time.perf_counter()
    steps = [optimizer_step(i) for i in range(args.case_steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    triplets, tokens = sum(s[0] for s in steps), sum(s[1] for s in steps)
    result = {"batch": args.case_batch, "mini": args.case_mini, "steps": args.case_steps, "triplets": triplets,
              "tokens": tokens, "seconds": round(seconds, 3), "s_per_triplet": seconds / triplets,
              "device": str(trainer.inner.device)}
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result.update(memory_bytes=peak - before, peak_bytes=peak,
                      memory_measured_by="torch.cuda.max_memory_allocated minus allocated before the warm-up")
    else:
        result.update(rss_bytes=_status_kib("VmHWM") * 1024 - before, peak_bytes=_status_kib("VmHWM") * 1024)
        # the same steps again, under the profiler (which slows them): the tensors' peak, not the C heap's
        result.update(memory_bytes=cpu_tensor_peak_bytes(lambda: [optimizer_step(i) for i in range(args.case_steps)]),
                      memory_measured_by="peak bytes of torch's CPU tensors during the measured steps, replayed "
                                         "under torch.profiler(profile_memory=True)")
    return result


def lengthen_passages(path: Path, words: int) -> None:
    """Pad every positive and negative of the triplets file to `words` words with filler words (seeded), so
    the bench measures passages of a realistic length; the synthetic task's own passages are 5 words."""
    from nova.training.synthetic import WORDS

    rng = random.Random(0)

    def lengthen(passage: str) -> str:
        have = passage.split()
        return " ".join(have + [rng.choice(WORDS) for _ in range(max(0, words - len(have)))])

    records = [json.loads(line) for line in path.read_text().splitlines()]
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            record["positive"] = lengthen(record["positive"])
            record["negatives"] = [lengthen(n) for n in record["negatives"]]
            handle.write(json.dumps(record) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512, help="the large contrastive batch (default: %(default)s)")
    parser.add_argument("--mini", type=int, default=8, help="mini-batch of the cached path, and the small batch "
                                                            "(default: %(default)s)")
    parser.add_argument("--small-steps", type=int, default=16,
                        help="measured steps of the small batch (default: %(default)s)")
    parser.add_argument("--large-steps", type=int, default=1,
                        help="measured steps of each large-batch case (default: %(default)s)")
    parser.add_argument("--model", help="model folder (default: the tiny random-weight checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-uncached", action="store_true", help="skip the large batch in one graph")
    parser.add_argument("--hard-negatives", type=int, default=3, help="per triplet (default: %(default)s)")
    parser.add_argument("--passage-words", type=int, default=100,
                        help="lengthen every passage to this many words with filler words, about as many tokens "
                             "(default: %(default)s; 0: the synthetic task's own 5 words)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    # one case, in a child process
    parser.add_argument("--case-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case-mini", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case_batch:
        print(json.dumps(run_case(args)))
        return 0

    from nova.training.synthetic import make_task

    with tempfile.TemporaryDirectory() as folder:
        data = make_task(Path(folder) / "task", words_per_query=3, train_queries=max(args.batch, 64) * 2,
                         eval_queries=10, distractors=10, hard_negatives=args.hard_negatives)["train"]
        if args.passage_words:
            lengthen_passages(data, args.passage_words)
        cases = [("small", args.mini, args.mini, args.small_steps),
                 ("cached", args.batch, args.mini, args.large_steps)]
        if not args.no_uncached:
            cases.append(("uncached", args.batch, args.batch, args.large_steps))
        results = {}
        for name, batch, mini, steps in cases:
            command = [sys.executable, __file__, "--case-batch", str(batch), "--case-mini", str(mini), "--case-steps",
                       str(steps), "--warmup-batch", str(args.mini), "--data", str(data),
                       "--out", str(Path(folder) / name), "--device", args.device, "--rank", str(args.rank)]
            command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
            command += ["--model", args.model] if args.model else []
            command += ["--precision", args.precision] if args.precision else []
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[name]
            print(f"{name:9s} batch {batch:5d} mini-batch {mini:5d}: {r['triplets']} triplets in {r['seconds']:.1f} s "
                  f"= {1000 * r['s_per_triplet']:.1f} ms/triplet, {r['triplets'] / r['seconds']:,.1f} triplets/s, "
                  f"{r['tokens'] / r['seconds']:,.0f} tokens/s ({r['tokens'] / r['triplets']:.0f} tokens per triplet); "
                  f"memory {r['memory_bytes'] / 2**20:,.0f} MiB [{r['memory_measured_by']}]"
                  + (f", resident set {r['rss_bytes'] / 2**20:,.0f} MiB more than before the steps" if 'rss_bytes' in r
                     else "") + f", process peak {r['peak_bytes'] / 2**30:,.2f} GiB", flush=True)
    small, cached = results["small"], results["cached"]
    print(f"memory, cached batch {args.batch} / batch {args.mini}: "
          f"{cached['memory_bytes'] / small['memory_bytes']:.2f}x (target <= 1.10x)")
    if "rss_bytes" in small:
        print(f"resident set added by the steps, cached batch {args.batch} / batch {args.mini}: "
              f"{cached['rss_bytes'] / small['rss_bytes']:.2f}x (includes what the C allocator keeps after freeing)")
    if "uncached" in results:
        uncached = results["uncached"]
        print(f"memory, uncached batch {args.batch} / batch {args.mini}: "
              f"{uncached['memory_bytes'] / small['memory_bytes']:.2f}x")
        print(f"time per triplet, cached / uncached at batch {args.batch}: "
              f"{cached['s_per_triplet'] / uncached['s_per_triplet']:.2f}x (target <= 1.5x)")
    print(f"time per triplet, cached batch {args.batch} / batch {args.mini}: "
          f"{cached['s_per_triplet'] / small['s_per_triplet']:.2f}x")
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if not k.startswith(("case_", "warmup"))
                               and k not in ("data", "out")}, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
