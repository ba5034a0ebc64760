"""Server settings: one dataclass, TEI-like defaults, each documented once (the CLI help reuses them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Defaults in the spirit of text-embeddings-inference (TEI): 2 MB payloads, 16k-token batches, client
# batches of up to 32 items (TEI's value; OpenAI's SDK sends 2048 per call, so operators raise it),
# 512 concurrent requests before backpressure.
DEFAULT_PORT = 8080
DEFAULT_PAYLOAD_LIMIT = 2_000_000
DEFAULT_MAX_BATCH_TOKENS = 16_384
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_WAIT_MS = 0.0  # no fixed wait: batches form while the model is busy (TEI)
DEFAULT_MAX_QUEUE_TOKENS = 262_144
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_MAX_CLIENT_BATCH_SIZE = 32
DEFAULT_MAX_INPUT_TOKENS = 8_192
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGE_BYTES = 10_000_000
DEFAULT_IMAGE_URL_TIMEOUT = 10.0
DEFAULT_GRACEFUL_SHUTDOWN = 30


ENGINES = ("auto", "process", "thread")


@dataclass
class Settings:
    # model
    model: str | None = None  # None -> bundled tiny random-weight checkpoint
    served_model_name: list[str] = field(default_factory=list)  # first is the primary name
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    chat_template: str | None = None
    is_multi_vector_embeddings: bool = False  # default of `return_multivector`
    default_task: str | None = None  # None -> the model's config.default_task
    torch_threads: int | None = None  # intra-op CPU threads of the forward; None -> torch's default
    engine: str = "auto"  # process | thread | auto: process when the server loads the model, thread when handed one
    # adapters
    enable_lora: bool = False
    max_loras: int = 8
    max_lora_rank: int = 64
    load_lora: list[tuple[str, str]] = field(default_factory=list)
    lora_root: str | None = None
    lora_drain_timeout: float = 60.0
    # network
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # batching
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_queue_tokens: int = DEFAULT_MAX_QUEUE_TOKENS
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    preprocess_workers: int = 0  # 0 -> min(4, cpu count)
    prefix_cache_mb: int = 256  # instruction prefix key/values kept for reuse; 0 disables the cache
    pad_to_multiple_of: int = 0  # batches' padded length rounded up to a multiple of it; 0 -> the model's auto
    cuda_graphs: bool = False  # replay text-only batches through CUDA graphs (CUDA only)
    # limits
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE
    payload_limit: int = DEFAULT_PAYLOAD_LIMIT
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    auto_truncate: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resize_max_pixels: int | None = None  # None -> the image processor's max_pixels
    # security
    api_keys: list[str] = field(default_factory=list)
    admin_api_key: str | None = None
    allow_image_urls: bool = False
    image_url_allowlist: list[str] = field(default_factory=list)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_url_timeout: float = DEFAULT_IMAGE_URL_TIMEOUT
    # operations
    graceful_shutdown_timeout: int = DEFAULT_GRACEFUL_SHUTDOWN
    log_level: str = "info"

    def validate(self) -> None:
        """Raise ValueError on settings that cannot work together."""
        positive = {
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_size": self.max_batch_size,
            "max_queue_tokens": self.max_queue_tokens,
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_client_batch_size": self.max_client_batch_size,
            "payload_limit": self.payload_limit,
            "max_input_tokens": self.max_input_tokens,
            "max_image_pixels": self.max_image_pixels,
            "max_image_bytes": self.max_image_bytes,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
        }
        for name, value in positive.items():
            if int(value) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0-65535 (0 = any free port), got {self.port}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be >= 0")
        if self.cuda_graphs and self.device.startswith("cpu"):
            raise ValueError("--cuda-graphs needs the model on CUDA (--device cuda or auto on a GPU machine)")
        if self.allow_image_urls and not self.image_url_allowlist:
            raise ValueError(
                "--allow-image-urls needs --image-url-allowlist HOST (repeatable; '*' allows any public host)"
            )
        if self.load_lora and not self.enable_lora:
            raise ValueError("--load-lora needs --enable-lora")
        if self.lora_root is not None and not os.path.isdir(self.lora_root):
            raise ValueError(f"--lora-root {self.lora_root!r} is not a directory")
        for key in self.api_keys:
            if not key:
                raise ValueError("--api-key must not be empty")
        if self.admin_api_key is not None and not self.admin_api_key:
            raise ValueError("--admin-api-key must not be empty")

    def engine_kind(self, *, model_given: bool) -> str:
        """Where the model runs: "process" (its own, the default of `nova serve`) or "thread" (this process:
        the only choice for a model object handed to `create_app`, which cannot move to another process)."""
        if self.engine == "process" and model_given:
            raise ValueError("--engine process loads the model in its own process; create_app(model=...) hands "
                             "over an object that lives in this one (use engine='thread' or 'auto')")
        if self.engine == "auto":
            return "thread" if model_given else "process"
        return self.engine

    @property
    def primary_model_name(self) -> str:
        return self.served_model_name[0] if self.served_model_name else default_model_name(self.model)

    def model_names(self) -> list[str]:
        names = list(self.served_model_name) or [default_model_name(self.model)]
        return names


def default_model_name(model: str | None) -> str:
    if model is None:
        return "nova-embeddings-v1-tiny"
    path = model.rstrip("/\\")
    if os.path.isdir(path):
        return os.path.basename(os.path.abspath(path)) or path
    return path  # a hub id: "org/name"
