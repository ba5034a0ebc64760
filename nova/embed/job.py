"""One `nova embed` run: what it reads, how it embeds, where it writes; both runners take a `Job`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .inputs import InputPlan
from .output import FORMAT_VERSION
from .stages import EmbedOptions, ItemDefaults


@dataclass
class Job:
    plan: InputPlan
    model_ref: str | None
    model: dict  # output.model_identity()
    defaults: ItemDefaults
    options: EmbedOptions
    shard_rows: int
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    pending: list = field(default_factory=list)  # shards not committed yet

    def settings(self) -> dict:
        """What decides the output; a folder only takes runs whose settings are equal (workers, Ray address,
        batch sizes, CUDA graphs and device do not change vectors beyond float tolerance, so they may differ)."""
        options = asdict(self.options)
        for how in ("max_batch_tokens", "max_batch_size", "cuda_graphs"):
            options.pop(how)
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "input": self.plan.identity(),
            "shard_rows": self.shard_rows,
            "defaults": asdict(self.defaults),
            "options": options,
        }

    def worker_kwargs(self) -> dict:
        return {"model_ref": self.model_ref, "options": self.options, "device": self.device, "dtype": self.dtype,
                "trust_remote_code": self.trust_remote_code}
