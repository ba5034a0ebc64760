"""Joining or starting Ray, the same way for `nova embed` and `nova serve --ray`."""

from __future__ import annotations

import os

# A local Ray's workers get the driver's Nova and Hugging Face settings (caches, offline mode, import path);
# on a cluster these belong in the image or the RayCluster spec, since the driver's paths mean nothing there.
FORWARDED_ENV = ("PYTHONPATH", "NOVA_HOME", "HF_HOME", "HF_MODULES_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def init_ray(address: str | None, *, namespace: str | None = None, log_to_driver: bool = True) -> bool:
    """Join the cluster at `address`, or start a local Ray when it is None. -> False when Ray was already
    initialized in this process (then the caller must not shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    ray.init(address=address, namespace=namespace, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"env_vars": env} if address is None else None)
    return True
