"""Several training processes, one logical batch: what `nova train` needs from `torch.distributed`.

`torchrun` starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this
module joins them into one process group (gloo on the CPU, nccl on CUDA) and offers the few collectives the
trainer uses: a padded all-gather (shards of different sizes), a sum of the LoRA gradients, and rank 0's
decisions (output folder, resume state) shared with the others. A plain `nova train` is one process and every
collective is the identity, so one code path serves both.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Processes:
    """This process's place in the run: rank 0 writes every file and log line."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    @classmethod
    def from_environment(cls, device_type: str) -> Processes:
        """Join torchrun's process group (a single process without torchrun's variables). The backend follows
        the device: nccl for CUDA tensors, gloo for CPU tensors."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start several processes with "
                               "torchrun (torchrun --nproc-per-node N -m nova train ...)")
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if world == 1:
            return cls(local_rank=local_rank)
        import torch.distributed as dist

        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=rank, world=world, local_rank=local_rank, backend=backend)

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # -- rank 0's decisions --
    def share(self, value):
        """Rank 0's `value` on every rank (any picklable object; others pass None)."""
        if not self.active:
            return value
        import torch.distributed as dist

        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def run_on_main(self, action):
        """`action()` on rank 0 only; its result on every rank. An error raised there is raised on every rank
        (same type when it pickles), so no process waits forever for one that gave up."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", action())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                outcome = ("error", exc)
        outcome = self.share(_picklable(outcome))
        kind, value = outcome
        if kind == "error":
            raise value
        return value

    # -- tensors --
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over processes."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: rank 0's values everywhere."""
        if self.active:
            import torch.distributed as dist

            dist.broadcast(tensor, src=0)
        return tensor

    def max_int(self, value: int, device: torch.device) -> int:
        if not self.active:
            return value
        import torch.distributed as dist

        holder = torch.tensor([value], device=device)
        dist.all_reduce(holder, op=dist.ReduceOp.MAX)
        return int(holder.item())

    def gather_rows(self, local: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Every process's `local` ([sizes[rank], ...]; the trailing dimensions equal on all ranks), in rank
        order. Shards may differ in rows: each is padded to the largest for the collective and cut back."""
        if not self.active:
            return [local]
        import torch.distributed as dist

        if local.shape[0] != sizes[self.rank]:
            raise RuntimeError(f"rank {self.rank}: {local.shape[0]} rows, expected {sizes[self.rank]}")
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        received = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(received, padded.contiguous())
        return [part[:size] for part, size in zip(received, sizes, strict=True)]


def _picklable(outcome):
    """Exceptions that do not survive pickling travel as a RuntimeError with their message."""
    if outcome is None or outcome[0] != "error":
        return outcome
    try:
        pickle.loads(pickle.dumps(outcome[1]))
        return outcome
    except Exception:  # noqa: BLE001 - any pickling failure: keep the message
        return ("error", RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}"))


def shard_bounds(total: int, world: int) -> list[int]:
    """[0, ..., total]: rank r takes rows bounds[r]:bounds[r + 1] (sizes differ by at most one)."""
    return [r * total // world for r in range(world + 1)]
