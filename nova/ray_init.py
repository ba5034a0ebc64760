"""Joining or starting Ray, the same way for `nova embed` and `nova serve --ray`, and keeping Ray's own console
output out of a command's output unless asked for.

Ray writes to the driver's terminal from three places: the "ray" Python logger (INFO lines such as "Started a
local Ray instance", the authentication-token notice), its C++ core (glog lines such as `[... E ...]
core_worker.cc:...`, printed for conditions Ray itself handles), and Ray Data (an "execution plan" and
"finished" line per run, a "progress bars disabled" warning, and Python warnings about concurrency). None of
them is about the user's job, and the C++ "E" lines read like failures. Quiet mode keeps all of them off the
terminal; they stay in Ray's session logs (/tmp/ray/session_*/logs), and `--log-level debug` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

INSTALL_RAY = "pip install 'nova-embeddings[ray]'"  # what a command without Ray tells its user

# A local Ray's workers get the driver's Nova and Hugging Face settings (caches, offline mode, import path);
# on a cluster these belong in the image or the RayCluster spec, since the driver's paths mean nothing there.
FORWARDED_ENV = ("PYTHONPATH", "NOVA_HOME", "HF_HOME", "HF_MODULES_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# Environment for Ray's C++ core and log forwarding; read when the core starts, so set before `ray.init`. A value
# the user set wins. Only "fatal" keeps the core's "E" lines (conditions Ray handles itself) off stderr.
QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal"}
VERBOSE_ENV = {"RAY_BACKEND_LOG_LEVEL": "info", "RAY_DEDUP_LOGS": "0"}


def init_ray(address: str | None, *, namespace: str | None = None, log_to_driver: bool = True,
             quiet: bool = False) -> bool:
    """Join the cluster at `address`, or start a local Ray when it is None. -> False when Ray was already
    initialized in this process (then the caller must not shut it down).

    `quiet`: Ray's console output is kept off the terminal (see the module docstring); otherwise Ray logs at
    DEBUG, its C++ core at INFO, and forwarded worker output (`log_to_driver`) is not deduplicated."""
    for key, value in (QUIET_ENV if quiet else VERBOSE_ENV).items():
        os.environ.setdefault(key, value)
    if quiet:
        # Ray Data warns (Python warnings) from its operators, on the driver
        warnings.filterwarnings("ignore", module=r"ray\.")
    import ray

    if ray.is_initialized():
        return False
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    with _stderr_held_back() if quiet else contextlib.nullcontext():
        ray.init(address=address, namespace=namespace, include_dashboard=False,
                 log_to_driver=log_to_driver,
                 logging_level=logging.ERROR if quiet else logging.DEBUG,
                 runtime_env={"env_vars": env} if address is None else None)
    return True


@contextlib.contextmanager
def _stderr_held_back():
    """Ray's C++ core says which log level it read from the environment, on stderr, as it starts (even at
    "fatal"): what reaches file descriptor 2 while Ray starts is held back, and shown only if the start fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            os.write(2, held.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_ray_data(quiet: bool) -> None:
    """Ray Data's console handler at ERROR (its file log under the session folder keeps everything). Called
    after `ray.data` is imported: Ray Data configures its logger on import."""
    import ray.data  # noqa: F401 - configures the "ray.data" logger

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR if quiet else logging.DEBUG)
