"""Where the model runs, and the contract the rest of the server holds it to.

- `runner.py`: the model side of a batch (`ModelRunner`), loading and readying a model for serving;
- `threads.py`: `ThreadEngine`, the runner on threads of the server process;
- `process.py`: `ProcessEngine`, the runner in a process of its own (the default), `RemoteModel`, and
  `spawn_engine` (one model process for one or several HTTP workers, one `EngineLink` each);
- `child.py`: that process's main loop; `framing.py`: the pipe's messages.

Both engines answer `Engine`; the model object the server's routes and admin calls read (`server.model`) is
either the model itself (thread engine) or a `RemoteModel` (process engine): both answer `ServedModel`.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..rows import BatchResult, EmbeddingRow
from .process import (
    EngineExited,
    EngineLink,
    EngineNotices,
    ModelLoadFailed,
    ProcessEngine,
    RemoteModel,
    spawn_engine,
)
from .runner import ModelRunner, load_model_for, prepare_for_serving
from .threads import ThreadEngine


class Engine(Protocol):
    """Runs batches of rows through the model, one forward at a time, collating the next meanwhile."""

    async def embed(self, rows: list[EmbeddingRow]) -> BatchResult: ...

    def prefix_cache_stats(self) -> dict: ...

    async def stop(self) -> None: ...


class ServedModel(Protocol):
    """What the server process reads of the model it serves: the processor (tokenizing and routing happen in
    the server process), the config, the adapter limits and the adapter calls."""

    processor: Any  # NovaEmbeddingsV1Processor
    config: Any  # NovaEmbeddingsV1Config
    max_loras: int
    max_lora_rank: int

    def check_dimensions(self, dimensions: int | None, return_multivector: bool = False) -> None: ...

    def list_adapters(self) -> dict[str, dict]: ...

    def load_adapter(self, name: str, path: str) -> list[str]: ...

    def unload_adapter(self, name: str) -> None: ...


__all__ = [
    "Engine", "EngineExited", "EngineLink", "EngineNotices", "ModelLoadFailed", "ModelRunner", "ProcessEngine",
    "RemoteModel", "ServedModel", "ThreadEngine", "load_model_for", "prepare_for_serving", "spawn_engine",
]
