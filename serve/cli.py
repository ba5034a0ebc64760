"""`nova serve [MODEL]`: flags -> Settings -> uvicorn. Every flag shows its default in `--help`."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from nova.argtypes import lora_spec, non_negative_int, positive_int

from .config import Settings
from .ray_serve import add_ray_arguments, ray_requested

LISTEN_BACKLOG = 2048  # uvicorn's default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # One line, not argparse's usage block (dozens of lines here) in front of the error.
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")
    parser.description = (
        "Run the Nova embedding server (OpenAI-compatible POST /v1/embeddings, plus Jina and Nova request "
        "forms).\nWith no MODEL it serves the bundled tiny checkpoint, whose weights are RANDOM (tests only)."
    )
    parser.epilog = "API keys can also come from NOVA_API_KEY (comma-separated) and NOVA_ADMIN_API_KEY. See docs/server.md."
    d = Settings()
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a Nova directory, a Jina V4 directory or a hub id (default: the bundled tiny "
                             "random-weight checkpoint)")

    g = parser.add_argument_group("model")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients may put in 'model'; the first is reported (default: the directory name, "
                        "the hub id, or nova-embeddings-v1-tiny)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the model directory's own remote code (needed for Nova directories that carry "
                        "*_nova_embeddings_v1.py; the bundled checkpoint is always trusted) (default: off)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto = float32 on CPU, bfloat16 on CUDA (default: %(default)s)")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ...; auto = cuda when available "
                                                      "(default: %(default)s)")
    g.add_argument("--chat-template", default=None, metavar="PATH",
                   help="chat_template.json (or a Jinja file) replacing the model's (default: the model's)")
    g.add_argument("--is-multi-vector-embeddings", action="store_true",
                   help="default of 'return_multivector' when a request omits it (default: off = pooled vectors)")
    g.add_argument("--default-task", default=None,
                   help="task of items that name none (plain OpenAI strings) (default: the model's "
                        "default_task, 'retrieval' = retrieval query)")
    g.add_argument("--torch-threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of one forward (torch.set_num_threads, on the thread that runs forwards) "
                        "(default: torch's own, one per core)")
    g.add_argument("--engine", default=d.engine, choices=["auto", "process", "thread"],
                   help="where the model runs: process = a process of its own, so that HTTP parsing, tokenizing "
                        "and response encoding never hold up the forward on Python's GIL; thread = inside the "
                        "server process; auto = process (default: %(default)s)")

    g = parser.add_argument_group("adapters")
    g.add_argument("--enable-lora", action="store_true",
                   help="allow --load-lora and the /v1/internal/lora routes; the checkpoint's own task "
                        "adapters are always loaded (default: off)")
    g.add_argument("--max-loras", type=positive_int, default=d.max_loras,
                   help="adapters resident at once, task adapters included (default: %(default)s)")
    g.add_argument("--max-lora-rank", type=positive_int, default=d.max_lora_rank,
                   help="largest LoRA rank accepted (default: %(default)s)")
    g.add_argument("--load-lora", action="append", type=lora_spec, default=[], metavar="NAME=PATH",
                   help="load a PEFT adapter folder (or its adapter_model.safetensors) at start-up; repeatable; "
                        "needs --enable-lora (default: none)")
    g.add_argument("--lora-root", default=None, metavar="DIR",
                   help="the only directory run-time loads may read adapters from (default: none = run-time "
                        "loading refused)")
    g.add_argument("--lora-drain-timeout", type=float, default=d.lora_drain_timeout, metavar="SECONDS",
                   help="how long an unload waits for admitted rows to finish (default: %(default)s)")

    g = parser.add_argument_group("network")
    g.add_argument("--host", default=d.host, help="bind address (default: %(default)s; 0.0.0.0 to expose)")
    g.add_argument("--port", type=int, default=d.port, help="port (default: %(default)s)")
    g.add_argument("--graceful-shutdown-timeout", type=int, default=d.graceful_shutdown_timeout, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may take to finish (default: %(default)s)")
    g.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"],
                   help="(default: %(default)s)")

    g = parser.add_argument_group("batching")
    g.add_argument("--max-batch-tokens", "--max-num-batched-tokens", dest="max_batch_tokens", type=positive_int,
                   default=d.max_batch_tokens,
                   help="padded tokens (rows x longest row) per forward pass; --max-num-batched-tokens is vLLM's "
                        "name for it (default: %(default)s)")
    g.add_argument("--max-batch-size", type=positive_int, default=d.max_batch_size,
                   help="rows per forward pass (default: %(default)s)")
    g.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest a row waits for company while the model is idle; while it is busy rows gather "
                        "anyway (default: %(default)s = start at once)")
    g.add_argument("--max-queue-tokens", type=positive_int, default=d.max_queue_tokens,
                   help="queued tokens before new requests get 429 + Retry-After (default: %(default)s)")
    g.add_argument("--max-concurrent-requests", type=positive_int, default=d.max_concurrent_requests,
                   help="embedding requests handled at once before 429 (default: %(default)s)")
    g.add_argument("--preprocess-workers", type=int, default=d.preprocess_workers,
                   help="threads decoding images and tokenizing; 0 = min(4, CPUs) (default: %(default)s)")
    g.add_argument("--pad-to-multiple-of", type=non_negative_int, default=d.pad_to_multiple_of, metavar="N",
                   help="round each batch's padded length up to a multiple of N: fewer distinct batch shapes, each "
                        "of which costs a GPU a slow first forward; 0 = 16 on CUDA, 1 on CPU (default: %(default)s)")
    g.add_argument("--cuda-graphs", action="store_true", default=d.cuda_graphs,
                   help="replay text-only batches through CUDA graphs, one per batch shape (rows, padded length), "
                        "captured on first use; needs the model on CUDA (default: off)")
    g.add_argument("--prefix-cache-mb", type=non_negative_int, default=d.prefix_cache_mb, metavar="MB",
                   help="memory for cached instruction-prefix key/values (LRU); 0 disables (default: %(default)s)")

    g = parser.add_argument_group("limits")
    g.add_argument("--max-client-batch-size", type=positive_int, default=d.max_client_batch_size,
                   help="items per request; more answers 413 (default: %(default)s)")
    g.add_argument("--payload-limit", type=positive_int, default=d.payload_limit,
                   help="request body bytes; more answers 413 (default: %(default)s = 2 MB)")
    g.add_argument("--max-input-tokens", type=positive_int, default=d.max_input_tokens,
                   help="tokens per item (instructions and image tokens included); more answers 413 unless "
                        "truncated (default: %(default)s)")
    g.add_argument("--auto-truncate", action="store_true",
                   help="truncate the text of items over --max-input-tokens instead of refusing them; a request "
                        "may override with \"truncate\" (default: off)")
    g.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels,
                   help="largest source image (width x height), checked before decoding (default: %(default)s)")
    g.add_argument("--resize-max-pixels", type=positive_int, default=None,
                   help="images are resized to at most this many pixels before the vision tower (default: the "
                        "image processor's max_pixels)")

    g = parser.add_argument_group("security")
    g.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/embeddings and /v1/models; repeatable "
                        "(default: none = open)")
    g.add_argument("--admin-api-key", default=None, metavar="KEY",
                   help="key for /v1/internal/lora/* (default: none = admin routes refused)")
    g.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs for clients, only from --image-url-allowlist hosts and never "
                        "from private/loopback/link-local addresses (default: off)")
    g.add_argument("--image-url-allowlist", action="append", default=[], metavar="HOST",
                   help="host allowed for image URLs: exact, '*.example.com' or '*' (any public host); "
                        "repeatable (default: none)")
    g.add_argument("--max-image-bytes", type=positive_int, default=d.max_image_bytes,
                   help="largest image body fetched or decoded, in bytes (default: %(default)s)")
    g.add_argument("--image-url-timeout", type=float, default=d.image_url_timeout, metavar="SECONDS",
                   help="total time for one image URL fetch (default: %(default)s)")
    add_ray_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    api_keys = list(args.api_key)
    env_keys = os.environ.get("NOVA_API_KEY")
    if env_keys:
        api_keys += [k.strip() for k in env_keys.split(",") if k.strip()]
    admin = args.admin_api_key or os.environ.get("NOVA_ADMIN_API_KEY") or None
    return Settings(
        model=args.model,
        served_model_name=list(args.served_model_name or []),
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        device=args.device,
        chat_template=args.chat_template,
        is_multi_vector_embeddings=args.is_multi_vector_embeddings,
        default_task=args.default_task,
        engine=args.engine,
        torch_threads=args.torch_threads,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        load_lora=list(args.load_lora),
        lora_root=args.lora_root,
        lora_drain_timeout=args.lora_drain_timeout,
        host=args.host,
        port=args.port,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue_tokens=args.max_queue_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        preprocess_workers=args.preprocess_workers,
        prefix_cache_mb=args.prefix_cache_mb,
        pad_to_multiple_of=args.pad_to_multiple_of,
        cuda_graphs=args.cuda_graphs,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        max_input_tokens=args.max_input_tokens,
        auto_truncate=args.auto_truncate,
        max_image_pixels=args.max_image_pixels,
        resize_max_pixels=args.resize_max_pixels,
        api_keys=api_keys,
        admin_api_key=admin,
        allow_image_urls=args.allow_image_urls,
        image_url_allowlist=list(args.image_url_allowlist),
        max_image_bytes=args.max_image_bytes,
        image_url_timeout=args.image_url_timeout,
        graceful_shutdown_timeout=args.graceful_shutdown_timeout,
        log_level=args.log_level,
    )


def bind_listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as uvicorn's own `create_server` would bind them.
    Bound here, before the app starts (and before a model process is spawned), so that a port that cannot be
    bound ends `nova serve` at once, and "listening" is only ever logged for a socket that is."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)  # listening holds the port (two bound, unlistened sockets may share it)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """The one line `nova serve` ends with when it cannot listen."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the address is already in use (another server?); choose another --port"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); choose another --port"
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: --host {host!r} is not an address of this machine ({exc.strerror or exc})"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def one_line(message: str) -> str:
    """A message as one line (a library's, e.g. transformers', may span several): the process's last line."""
    return " ".join(str(message).split())


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from nova.loading import check_model_source

    from .app import create_app
    from .logs import setup_logging

    settings = settings_from_args(args)
    try:
        settings.validate()
        check_model_source(settings.model, trust_remote_code=settings.trust_remote_code)
        replicated = ray_requested(args)
    except ValueError as exc:
        print(f"nova serve: error: {one_line(exc)}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    log = logging.getLogger("serve")
    if replicated:
        log_startup_warnings(settings, log)
        from .ray_serve import run_replicated

        return run_replicated(settings, args)
    try:
        sockets = bind_listening_sockets(settings.host, settings.port)
    except OSError as exc:
        log.debug("cannot listen", exc_info=True)
        print(f"nova serve: error: {cannot_listen(settings.host, settings.port, exc)}", file=sys.stderr)
        return 1
    log_startup_warnings(settings, log)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout, lifespan="on",
        log_level=settings.log_level, backlog=LISTEN_BACKLOG,
    )
    server = uvicorn.Server(config)
    failed: list[str] = []

    def on_load_failed(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app.state.nova.on_load_failed = on_load_failed
    addresses = ", ".join(_url(sock) for sock in sockets)
    log.info("listening on %s (model names: %s)", addresses, ", ".join(settings.model_names()))
    try:
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    if failed:
        print(f"nova serve: error: {one_line(failed[0])}", file=sys.stderr)
        return 1
    return 0


def log_startup_warnings(settings: Settings, log: logging.Logger) -> None:
    if settings.model is None:
        log.warning("no MODEL given: serving the bundled tiny checkpoint with RANDOM WEIGHTS "
                    "(generated on first use, offline); its embeddings are meaningless")
    if settings.api_keys == [] and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach the port can use the server",
                    settings.host)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"
