"""A model's configuration, read without loading its weights: what a command checks and announces in its first
second rather than after a model load (a missing folder, untrusted remote code, unknown tasks or sizes, random
weights, which prompt a task uses).

Routing and size checks are the remote code's own (`NovaEmbeddingsV1Processor.resolve`, `check_dimensions`), run
on the config alone, as a processor that knows no model runs them: adapter names are not checked here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from nova.evaluation.errors import UserInputError
from nova.repo import model_class


@dataclass(frozen=True)
class ConfigRouting:
    """What `NovaEmbeddingsV1Processor.resolve` reads from its processor: the config, and no adapter names."""

    config: object
    adapter_names: None = None


@dataclass(frozen=True)
class ModelConfig:
    ref: str | None  # as the user gave it; None = the bundled tiny checkpoint
    path: str  # a local folder or a hub id
    config: object  # NovaEmbeddingsV1Config

    @property
    def random_weights(self) -> bool:
        return bool(getattr(self.config, "nova_random_weights", False))

    @property
    def tasks(self) -> set[str]:
        return set(self.config.task_routing)

    def route(self, task: str | None, adapter=None, prompt_set: str | None = None):
        """-> the remote code's `Route(task, prompt, adapter)`; an unknown task or prompt set is a ValueError."""
        processing = sys.modules[model_class("NovaEmbeddingsV1Processor").__module__]
        adapter = processing.INHERIT if adapter is None else adapter
        return processing.NovaEmbeddingsV1Processor.resolve(ConfigRouting(self.config), task, adapter,
                                                            prompt_set=prompt_set)

    def passage_task(self, task: str | None = None) -> str:
        """The passage side of `task` (default: the model's default task): `retrieval` -> `retrieval.passage`;
        a symmetric task (no `.passage` variant) is itself."""
        task = task or self.config.default_task
        side = f"{task.removesuffix('.query')}.passage"
        return side if side in self.config.task_routing else task

    def check_dimensions(self, dimensions: int | None, multivector: bool = False) -> None:
        processing = sys.modules[model_class("NovaEmbeddingsV1Processor").__module__]
        processing.check_dimensions(self.config, dimensions, multivector)


def read_model_config(model_ref: str | None, *, trust_remote_code: bool = True) -> ModelConfig:
    """The config of a Nova or Jina V4 folder or hub id (None: the bundled tiny checkpoint, generated if needed),
    after the checks `load_model` makes first (a missing folder; remote code not trusted)."""
    from nova.loading import check_model_source
    from nova.tiny import ensure_tiny_checkpoint

    if model_ref is not None:
        model_ref = os.path.expanduser(str(model_ref))
    try:
        check_model_source(model_ref, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    path = str(ensure_tiny_checkpoint()) if model_ref is None else model_ref
    try:
        config = model_class("NovaEmbeddingsV1Config").from_pretrained(path)
    except (OSError, ValueError) as exc:
        lines = str(exc).strip().splitlines()
        raise UserInputError(f"cannot read the config of model {path}: {lines[0] if lines else exc}") from None
    return ModelConfig(model_ref, path, config)
