"""Starting and stopping the replicated server: Ray (joined or started), the coordinator, the Serve application."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from nova.ray_init import INSTALL_RAY

from ..config import Settings
from .coordinator import COORDINATOR, NAMESPACE, AdapterCoordinator
from .replica import NovaReplica

log = logging.getLogger("serve.ray")


def deployment_options(settings: Settings, cluster_gpus: float) -> dict:
    gpus = settings.replica_gpus if settings.replica_gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    options = {
        "name": "nova",
        "ray_actor_options": {"num_cpus": settings.replica_cpus, "num_gpus": gpus},
        "max_ongoing_requests": settings.max_concurrent_requests,
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout,
        "health_check_period_s": 5,
    }
    if settings.min_replicas is not None or settings.max_replicas is not None:
        if settings.replicas is not None:
            raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
        low = settings.min_replicas if settings.min_replicas is not None else 1
        high = settings.max_replicas if settings.max_replicas is not None else max(low, 1)
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscaling bounds must satisfy 0 <= min <= max, max >= 1 (got {low}, {high})")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
    else:
        replicas = 1 if settings.replicas is None else settings.replicas
        if replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {replicas}")
        options["num_replicas"] = replicas
    return options


def start(settings: Settings) -> None:
    """Start (or join) Ray, the coordinator and the Serve application; returns once replicas are ready."""
    import ray
    from ray import serve

    from nova.ray_init import init_ray

    init_ray(settings.ray_address, namespace=NAMESPACE, quiet=settings.log_level != "debug")  # Ray's noise only in debug
    options = deployment_options(settings, ray.cluster_resources().get("GPU", 0))
    ray.remote(AdapterCoordinator).options(
        name=COORDINATOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1000,
    ).remote(settings.adapter_apply_timeout)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    deployment = serve.deployment(NovaReplica, **options)
    serve.run(deployment.bind(settings), name="nova", route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve

    serve.delete("nova")
    try:
        ray.kill(ray.get_actor(COORDINATOR, namespace=NAMESPACE))
    except ValueError:
        pass


def run_replicated(settings: Settings) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        print(f"nova serve: --ray needs Ray: {INSTALL_RAY}", file=sys.stderr)
        return 2
    try:
        deployment_options(settings, 0)
    except ValueError as exc:
        print(f"nova serve: {exc}", file=sys.stderr)
        return 2
    start(settings)
    log.info("Ray Serve: listening on http://%s:%d", settings.host, settings.port)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("stopping the Ray Serve application")
    stop()
    return 0
