"""`nova serve [MODEL]`: flags -> Settings -> uvicorn. Every flag shows its default in `--help`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import MISSING, fields

from .config import Flag, Settings, flag_name
from .listening import bind_listening_sockets, cannot_listen, one_line, serve_app, url_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `Settings` field, built from the field's default and its `Flag` (config.py)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    # One line, not argparse's usage block (dozens of lines here) in front of the error.
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")
    parser.description = (
        "Run the Nova embedding server (OpenAI-compatible POST /v1/embeddings, plus Jina and Nova request "
        "forms).\nWith no MODEL it serves the bundled tiny checkpoint, whose weights are RANDOM (tests only)."
    )
    parser.epilog = "API keys can also come from NOVA_API_KEY (comma-separated) and NOVA_ADMIN_API_KEY. See docs/server.md."
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in fields(Settings):
        flag: Flag = setting.metadata["flag"]
        default = setting.default_factory() if setting.default_factory is not MISSING else setting.default
        shown = flag.default_text if flag.default_text is not None else (
            "off" if default is False else "%(default)s")
        options: dict = {"help": f"{flag.help} (default: {shown})"}
        if flag.positional:
            parser.add_argument(setting.name, nargs="?", default=default, metavar=flag.metavar, **options)
            continue
        if default is False:
            options["action"] = "store_true"
        else:
            options.update(default=default, type=flag.type, choices=flag.choices, metavar=flag.metavar)
            if flag.many == "append":
                options["action"] = "append"
            elif flag.many == "+":
                options["nargs"] = "+"
        group = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        group.add_argument(flag_name(setting.name), *flag.aliases, dest=setting.name, **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The parsed flags as `Settings`; API keys also from the environment (NOVA_API_KEY, NOVA_ADMIN_API_KEY)."""
    values = {setting.name: getattr(args, setting.name) for setting in fields(Settings)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = list(value)  # argparse's "append" default is the shared list object
    env_keys = os.environ.get("NOVA_API_KEY")
    if env_keys:
        values["api_keys"] += [key.strip() for key in env_keys.split(",") if key.strip()]
    values["admin_api_key"] = values["admin_api_key"] or os.environ.get("NOVA_ADMIN_API_KEY") or None
    return Settings(**values)


def run(args: argparse.Namespace) -> int:
    from nova.loading import check_model_source

    from .app import create_app
    from .logs import setup_logging

    settings = settings_from_args(args)
    try:
        settings.validate()
        check_model_source(settings.model, trust_remote_code=settings.trust_remote_code)
        replicated = settings.ray
    except ValueError as exc:
        print(f"nova serve: error: {one_line(exc)}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    log = logging.getLogger("serve")
    if replicated:
        log_startup_warnings(settings, log)
        from .replicas.launch import run_replicated

        return run_replicated(settings)
    try:
        sockets = bind_listening_sockets(settings.host, settings.port)
    except OSError as exc:
        log.debug("cannot listen", exc_info=True)
        print(f"nova serve: error: {cannot_listen(settings.host, settings.port, exc)}", file=sys.stderr)
        return 1
    log_startup_warnings(settings, log)
    addresses = ", ".join(url_of(sock) for sock in sockets)
    log.info("listening on %s (model names: %s)", addresses, ", ".join(settings.model_names()))
    try:
        if settings.http_workers > 1:
            from .workers import run_http_workers

            return run_http_workers(settings, sockets)
        failure = serve_app(create_app(settings), settings, sockets)
    finally:
        for sock in sockets:
            sock.close()
    if failure is not None:
        print(f"nova serve: error: {one_line(failure)}", file=sys.stderr)
        return 1
    return 0


def log_startup_warnings(settings: Settings, log: logging.Logger) -> None:
    if settings.model is None:
        log.warning("no MODEL given: serving the bundled tiny checkpoint with RANDOM WEIGHTS "
                    "(generated on first use, offline); its embeddings are meaningless")
    if settings.api_keys == [] and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without --api-key: anyone who can reach the port can use the server",
                    settings.host)
