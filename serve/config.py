"""Server settings: one dataclass, TEI-like defaults; each setting's flag and help are defined with it, and
`nova serve`'s parser (serve/cli.py) is built from them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from nova.argtypes import lora_spec, non_negative_int, positive_int
from nova.ray_init import INSTALL_RAY

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
DEFAULT_MAX_RERANK_DOCUMENTS = 1000  # Cohere's rerank API takes up to 1000 documents a request
DEFAULT_MAX_INPUT_TOKENS = 8_192
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_IMAGE_BYTES = 10_000_000
DEFAULT_IMAGE_URL_TIMEOUT = 10.0
DEFAULT_GRACEFUL_SHUTDOWN = 30
RAY_GROUP = "replicated serving on Ray Serve (docs/scale-out.md)"


ENGINES = ("auto", "process", "thread")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Flag:
    """How a setting appears on `nova serve`'s command line (serve/cli.py builds the parser from these)."""

    group: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    option: str | None = None  # the flag, when not `--` + the field's name with dashes
    aliases: tuple[str, ...] = ()  # other option strings (e.g. vLLM's name for the same setting)
    default_text: str | None = None  # how `--help` shows the default; None: the default itself
    many: str | None = None  # "append": repeatable flag; "+": one flag, several values
    positional: bool = False


def setting(default=None, *, factory: Callable[[], Any] | None = None, **flag) -> Any:
    """A Settings field and its flag, defined together."""
    metadata = {"flag": Flag(**flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Settings:
    """Every server setting, each defined once: its default, its flag and its help (`nova serve --help`)."""

    # model
    model: str | None = setting(
        None, group="model", positional=True, metavar="MODEL",
        help="a Nova directory, a Jina V4 directory or a hub id",
        default_text="the bundled tiny random-weight checkpoint")
    served_model_name: list[str] = setting(
        factory=list, group="model", many="+", metavar="NAME",
        help="names clients may put in 'model'; the first is reported",
        default_text="the directory name, the hub id, or nova-embeddings-v1-tiny")
    trust_remote_code: bool = setting(
        False, group="model",
        help="run the model directory's own remote code (needed for Nova directories that carry "
             "*_nova_embeddings_v1.py; the bundled checkpoint is always trusted)")
    dtype: str = setting("auto", group="model", choices=DTYPE_CHOICES,
                         help="weights dtype; auto = float32 on CPU, bfloat16 on CUDA")
    device: str = setting("auto", group="model", help="cpu, cuda, cuda:1 ...; auto = cuda when available")
    chat_template: str | None = setting(
        None, group="model", metavar="PATH", help="chat_template.json (or a Jinja file) replacing the model's",
        default_text="the model's")
    is_multi_vector_embeddings: bool = setting(
        False, group="model", help="default of 'return_multivector' when a request omits it (off = pooled vectors)")
    default_task: str | None = setting(
        None, group="model", help="task of items that name none (plain OpenAI strings)",
        default_text="the model's default_task, 'retrieval' = retrieval query")
    torch_threads: int | None = setting(
        None, group="model", type=positive_int, metavar="N",
        help="CPU threads of one forward (torch.set_num_threads, on the thread that runs forwards)",
        default_text="torch's own, one per core")
    engine: str = setting(
        "auto", group="model", choices=ENGINES,
        help="where the model runs: process = a process of its own, so that HTTP parsing, tokenizing and "
             "response encoding never hold up the forward on Python's GIL; thread = inside the server process; "
             "auto = process, or thread for a model object handed to create_app")
    http_workers: int = setting(
        1, group="model", type=positive_int, metavar="N",
        help="HTTP worker processes in front of the one model process (parsing, tokenizing and encoding "
             "responses in parallel; their batches run as one forward); more than 1 needs the process engine")
    # adapters
    enable_lora: bool = setting(
        False, group="adapters",
        help="allow --load-lora and the /v1/internal/lora routes; the checkpoint's own task adapters are "
             "always loaded")
    max_loras: int = setting(8, group="adapters", type=positive_int,
                             help="adapters resident at once, task adapters included")
    max_lora_rank: int = setting(64, group="adapters", type=positive_int, help="largest LoRA rank accepted")
    load_lora: list[tuple[str, str]] = setting(
        factory=list, group="adapters", type=lora_spec, many="append", metavar="NAME=PATH",
        help="load a PEFT adapter folder (or its adapter_model.safetensors) at start-up; repeatable; needs "
             "--enable-lora", default_text="none")
    lora_root: str | None = setting(
        None, group="adapters", metavar="DIR", help="the only directory run-time loads may read adapters from",
        default_text="none = run-time loading refused")
    lora_drain_timeout: float = setting(
        60.0, group="adapters", type=float, metavar="SECONDS",
        help="how long an unload waits for admitted rows to finish")
    # network
    host: str = setting("127.0.0.1", group="network", help="bind address (0.0.0.0 to expose)")
    port: int = setting(DEFAULT_PORT, group="network", type=int, help="port (0 = any free port)")
    graceful_shutdown_timeout: int = setting(
        DEFAULT_GRACEFUL_SHUTDOWN, group="network", type=int, metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish")
    log_level: str = setting("info", group="network", choices=LOG_LEVELS, help="what the server logs")
    # batching
    max_batch_tokens: int = setting(
        DEFAULT_MAX_BATCH_TOKENS, group="batching", type=positive_int, aliases=("--max-num-batched-tokens",),
        help="padded tokens (rows x longest row) per forward pass; --max-num-batched-tokens is vLLM's name for it")
    max_batch_size: int = setting(DEFAULT_MAX_BATCH_SIZE, group="batching", type=positive_int,
                                  help="rows per forward pass")
    max_wait_ms: float = setting(
        DEFAULT_MAX_WAIT_MS, group="batching", type=float,
        help="longest a row waits for company while the model is idle; while it is busy rows gather anyway",
        default_text="0 = start at once")
    max_queue_tokens: int = setting(DEFAULT_MAX_QUEUE_TOKENS, group="batching", type=positive_int,
                                    help="queued tokens before new requests get 429 + Retry-After")
    max_concurrent_requests: int = setting(DEFAULT_MAX_CONCURRENT_REQUESTS, group="batching", type=positive_int,
                                           help="embedding requests handled at once before 429")
    preprocess_workers: int = setting(0, group="batching", type=non_negative_int,
                                      help="threads decoding images and tokenizing; 0 = min(4, CPUs)")
    pad_to_multiple_of: int = setting(
        0, group="batching", type=non_negative_int, metavar="N",
        help="round each batch's padded length up to a multiple of N: fewer distinct batch shapes, each of which "
             "costs a GPU a slow first forward; 0 = 16 on CUDA, 1 on CPU")
    cuda_graphs: bool = setting(
        False, group="batching",
        help="replay text-only batches through CUDA graphs, one per batch shape (rows, padded length, cached "
             "instruction prefix slots), captured on first use; needs the model on CUDA")
    prefix_cache_mb: int = setting(
        256, group="batching", type=non_negative_int, metavar="MB",
        help="memory for cached instruction-prefix key/values (LRU); 0 disables")
    # limits
    max_client_batch_size: int = setting(DEFAULT_MAX_CLIENT_BATCH_SIZE, group="limits", type=positive_int,
                                         help="items per request; more answers 413")
    max_rerank_documents: int = setting(
        DEFAULT_MAX_RERANK_DOCUMENTS, group="limits", type=positive_int,
        help="documents per rerank request (/v1/rerank, TEI's /rerank); more answers 413")
    payload_limit: int = setting(DEFAULT_PAYLOAD_LIMIT, group="limits", type=positive_int,
                                 help="request body bytes; more answers 413", default_text="2000000 = 2 MB")
    max_input_tokens: int = setting(
        DEFAULT_MAX_INPUT_TOKENS, group="limits", type=positive_int,
        help="tokens per item (instructions and image tokens included); more answers 413 unless truncated")
    auto_truncate: bool = setting(
        False, group="limits",
        help="truncate the text of items over --max-input-tokens instead of refusing them; a request may "
             "override with \"truncate\"")
    max_image_pixels: int = setting(DEFAULT_MAX_IMAGE_PIXELS, group="limits", type=positive_int,
                                    help="largest source image (width x height), checked before decoding")
    resize_max_pixels: int | None = setting(
        None, group="limits", type=positive_int,
        help="images are resized to at most this many pixels before the vision tower",
        default_text="the image processor's max_pixels")
    # security
    api_keys: list[str] = setting(
        factory=list, group="security", many="append", metavar="KEY", option="--api-key",
        help="require 'Authorization: Bearer KEY' on the embedding routes and /v1/models; repeatable; "
             "NOVA_API_KEY (comma-separated) adds more", default_text="none = open")
    admin_api_key: str | None = setting(
        None, group="security", metavar="KEY", help="key for /v1/internal/lora/* (or NOVA_ADMIN_API_KEY)",
        default_text="none = admin routes refused")
    allow_image_urls: bool = setting(
        False, group="security",
        help="fetch http(s) image URLs for clients, only from --image-url-allowlist hosts and never from "
             "private/loopback/link-local addresses")
    image_url_allowlist: list[str] = setting(
        factory=list, group="security", many="append", metavar="HOST",
        help="host allowed for image URLs: exact, '*.example.com' or '*' (any public host); repeatable",
        default_text="none")
    max_image_bytes: int = setting(DEFAULT_MAX_IMAGE_BYTES, group="security", type=positive_int,
                                   help="largest image body fetched or decoded, in bytes")
    image_url_timeout: float = setting(DEFAULT_IMAGE_URL_TIMEOUT, group="security", type=float,
                                       metavar="SECONDS", help="total time for one image URL fetch")
    # replicated serving on Ray Serve
    ray: bool = setting(False, group=RAY_GROUP,
                        help=f"serve as Ray Serve replicas behind one HTTP entry point (needs {INSTALL_RAY})")
    replicas: int | None = setting(None, group=RAY_GROUP, type=int, help="fixed number of replicas",
                                   default_text="1, unless --min/--max-replicas ask for autoscaling")
    min_replicas: int | None = setting(None, group=RAY_GROUP, type=int, help="autoscaling lower bound",
                                       default_text="1 when --max-replicas is given, else no autoscaling")
    max_replicas: int | None = setting(None, group=RAY_GROUP, type=int, help="autoscaling upper bound",
                                       default_text="--min-replicas when only that is given")
    ray_address: str | None = setting(None, group=RAY_GROUP, help="join a Ray cluster",
                                      default_text="start a local Ray")
    replica_cpus: float = setting(1.0, group=RAY_GROUP, type=float, help="CPUs per replica")
    replica_gpus: float | None = setting(None, group=RAY_GROUP, type=float, help="GPUs per replica",
                                         default_text="1 when the cluster has GPUs, else 0")
    adapter_apply_timeout: float = setting(
        120.0, group=RAY_GROUP, type=float, metavar="SECONDS",
        help="how long an adapter change waits for every replica")

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
                raise ValueError(f"{flag_name(name)} must be positive, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0-65535 (0 = any free port), got {self.port}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be >= 0")
        if self.http_workers < 1:
            raise ValueError(f"--http-workers must be positive, got {self.http_workers}")
        if self.http_workers > 1 and (self.engine == "thread" or self.ray):
            raise ValueError("--http-workers N > 1 runs the model in a process of its own that every worker "
                             "feeds; it does not apply with " + ("--ray" if self.ray else "--engine thread"))
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
        self._validate_ray()

    def _validate_ray(self) -> None:
        """A Ray-only flag without --ray is an error, not a silently ignored setting."""
        if not self.ray:
            given = [name for name in ("replicas", "min_replicas", "max_replicas", "ray_address", "replica_gpus")
                     if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(flag_name(name) for name in given)} only apply with --ray")
            return
        if self.engine == "process":
            raise ValueError("--engine process does not apply with --ray: each replica is a Ray actor process of "
                             "its own and runs its model on its threads (--engine thread)")

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


def flag_name(name: str) -> str:
    """A setting's flag: `max_batch_tokens` -> `--max-batch-tokens`."""
    flag = SETTING_FLAGS.get(name)
    return (flag.option if flag is not None and flag.option else None) or "--" + name.replace("_", "-")


@functools.lru_cache(maxsize=16)
def default_model_name(model: str | None) -> str:
    """The name a served model answers to without --served-model-name: a directory's name, or the hub id. Kept
    per path (every request checks its `model` field against it; a file-system lookup each time is waste)."""
    if model is None:
        return "nova-embeddings-v1-tiny"
    path = model.rstrip("/\\")
    if os.path.isdir(path):
        return os.path.basename(os.path.abspath(path)) or path
    return path  # a hub id: "org/name"


SETTING_FLAGS: dict[str, Flag] = {f.name: f.metadata["flag"] for f in fields(Settings)}
