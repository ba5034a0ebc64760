"""Run by tests/training/test_distributed.py, alone or under torchrun: `nova train`'s own steps up to one
contrastive batch's summed gradient (Trainer.start, setup, accumulate_gradients, synchronize_gradients), saved
by rank 0 with the batch's loss and negatives per query.

    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_gradients.py DATA OUT RESULT
"""

from __future__ import annotations

import sys

import torch

from nova.training.trainer import TrainConfig, Trainer


def main(data: str, out: str, result: str) -> None:
    config = TrainConfig(data=data, out=out, rank=4, dropout=0.0, batch_size=7, mini_batch_size=2,
                         vectors="both", false_negative_margin=0.0, steps=1, progress=False, device="cpu")
    trainer = Trainer(config, log=lambda message: None)
    trainer.start()
    try:
        trainer.setup()
        with torch.no_grad():  # a non-zero B, so that every LoRA matrix has a gradient
            generator = torch.Generator().manual_seed(1)
            for name, parameter in trainer.peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        report = trainer.accumulate_gradients(0)
        trainer.synchronize_gradients()
        if trainer.processes.is_main:
            grads = {name: p.grad.clone() for name, p in trainer.peft_model.named_parameters() if p.requires_grad}
            torch.save({"loss": report.loss, "grads": grads, "world": trainer.processes.world,
                        "negatives_per_query": report.negatives_per_query}, result)
    finally:
        trainer.processes.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
