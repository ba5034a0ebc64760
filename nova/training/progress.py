"""What a training run tells its user while it runs: one record per optimizer step (loss, learning rate,
throughput, negatives per query) on the progress line and in `OUT/train_log.jsonl`, and the memory it needs."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LOG_FILE = "train_log.jsonl"
MiB = 1 << 20
GiB = 1 << 30


@dataclass
class StepRecord:
    step: int
    total_steps: int
    loss: float  # this step's loss (the mean over its contrastive batches)
    loss_avg: float  # mean of the last 20 steps
    lr: float
    triplets_per_s: float
    tokens_per_s: float  # tokens embedded per second, all processes together (replays not counted)
    # negatives each query was contrasted with, on average: the candidates but its positive, its duplicates and
    # those the false-negative margin dropped
    negatives_per_query: float
    elapsed_s: float

    def text(self) -> str:
        return (f"step {self.step}/{self.total_steps} loss {self.loss_avg:.4f} lr {self.lr:.2e} "
                f"{self.triplets_per_s:.1f} triplets/s {self.tokens_per_s:,.0f} tokens/s "
                f"{self.negatives_per_query:.0f} negatives/query ({self.elapsed_s:.0f}s)")

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{self.loss_avg:.4f}", "lr": f"{self.lr:.2e}", "trip/s": f"{self.triplets_per_s:.1f}",
                "tok/s": f"{self.tokens_per_s:,.0f}", "neg/q": f"{self.negatives_per_query:.0f}"}


class TrainLog:
    """`OUT/train_log.jsonl`, one JSON object per step. A resumed run drops the records after its checkpoint
    (an interrupted run may have logged steps it is about to redo)."""

    def __init__(self, folder: Path, resumed_at: int | None):
        self.path = folder / LOG_FILE
        if resumed_at is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: StepRecord) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_plan(model: torch.nn.Module, trainable: list[torch.Tensor], processes: int) -> str:
    """What is resident before the first step, per process: the weights, and per trainable value its fp32
    master, gradient and two AdamW moments. Activations (one mini-batch's graph) come on top: measured after
    the first step."""
    weights = nbytes(p for p in model.parameters() if not p.requires_grad)
    lora = nbytes(trainable)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad})
    return (f"memory per process: weights {weights / GiB:.2f} GiB ({'/'.join(dtypes)}); LoRA {lora / MiB:.1f} MiB "
            f"+ gradients and AdamW states {3 * lora / MiB:.1f} MiB; activations of one mini-batch on top"
            + (f" ({processes} processes)" if processes > 1 else ""))


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, how it was measured): the CUDA allocator's peak on a GPU, the process's peak resident set on
    the CPU (it includes the Python interpreter and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), f"torch.cuda.max_memory_allocated on {device}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak resident memory of the process (getrusage)"
