"""`nova serve --ray`: the same application as N Ray Serve replicas behind Ray Serve's one HTTP entry point.

Each replica builds the app with the public factory `create_app(settings)` and answers requests by calling
it in-process (ASGI): same routes, request forms, errors, limits, auth and batcher; its own model. Only
three routes get a cluster-wide meaning (design: docs/scale-out.md):

- adapter load/unload: the replica that receives the call first checks the caller's admin key against its
  own app (`GET /v1/internal/lora`), then asks the `AdapterCoordinator` (one named actor) to change the
  desired adapter set. The coordinator bumps a version; every live replica (those sending heartbeats)
  reconciles its adapters to the new set through its own app's admin routes and acknowledges. The call
  answers 200 only when all of them succeeded; otherwise the coordinator rolls every replica back to the
  previous set and the call answers with the first replica's error. A replica started later (scale-up, a
  replacement for a dead one) loads the desired set before it takes traffic.
- `/health`: this replica's health plus the cluster view (replicas, the adapter version each applied).
- `/metrics`: every live replica's metrics, each sample labelled `replica="<id>"`, merged per family.

Ray is imported lazily: without it, `nova serve` works as before and `--ray` says how to install it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import threading
import time

from nova.ray_init import INSTALL_RAY

from .config import Settings

log = logging.getLogger("serve.ray")

COORDINATOR = "nova-adapter-coordinator"
NAMESPACE = "nova-serve"
HEARTBEAT_S = 1.0  # replicas report to the coordinator this often
REPLICA_TTL_S = 6.0  # a replica silent for this long is no longer waited for (it died; Serve replaces it)
POLL_S = 2.0  # long-poll timeout for adapter changes
ADMIN_ROUTES = {"/v1/internal/lora/load": "load", "/v1/internal/lora/unload": "unload"}


# ---------------------------------------------------------------------------------------------- coordinator


class AdapterCoordinator:
    """The desired set of run-time adapters ({name: lora_path}) and its version; replicas follow it.

    A change commits only when every live replica acknowledged it; otherwise the previous set is rolled out
    again and the change fails as a whole. One change at a time."""

    def __init__(self, apply_timeout: float):
        self.apply_timeout = apply_timeout
        self.desired: dict[str, str] = {}
        self.version = 0
        self.replicas: dict[str, dict] = {}  # id -> {"seen": monotonic, "applied": version, "report": {...}}
        self.acks: dict[int, dict[str, dict]] = {}
        self.changed = asyncio.Condition()
        self.lock = asyncio.Lock()

    def _live(self) -> list[str]:
        now = time.monotonic()
        return sorted(rid for rid, r in self.replicas.items() if now - r["seen"] < REPLICA_TTL_S)

    async def heartbeat(self, replica_id: str, report: dict) -> None:
        entry = self.replicas.setdefault(replica_id, {"applied": -1})
        entry.update(seen=time.monotonic(), report=report)

    async def register(self, replica_id: str) -> dict:
        self.replicas[replica_id] = {"seen": time.monotonic(), "applied": -1, "report": {}}
        return {"version": self.version, "desired": dict(self.desired)}

    async def poll(self, replica_id: str, applied: int) -> dict:
        """Returns the desired set as soon as its version differs from `applied` (or after POLL_S)."""
        async with self.changed:
            if self.version == applied:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.version != applied), POLL_S)
                except asyncio.TimeoutError:
                    pass
        return {"version": self.version, "desired": dict(self.desired)}

    async def ack(self, replica_id: str, version: int, outcome: dict) -> None:
        entry = self.replicas.setdefault(replica_id, {"report": {}})
        entry.update(seen=time.monotonic(), applied=version)
        self.acks.setdefault(version, {})[replica_id] = outcome
        async with self.changed:
            self.changed.notify_all()

    async def change(self, op: str, name: str, path: str | None) -> dict:
        """-> {"status", "body"}: what the admin route answers."""
        async with self.lock:
            before = dict(self.desired)
            if op == "load":
                if name in before:
                    return _error(400, f"adapter {name!r} is already loaded; unload it first", "adapter_exists",
                                  "lora_name")
                target = {**before, name: path}
            else:
                if name not in before:
                    return _error(404, f"adapter {name!r} was not loaded at run time; in replicated mode only "
                                  "adapters loaded through /v1/internal/lora/load can be unloaded (loaded: "
                                  f"{', '.join(sorted(before)) or 'none'})", "adapter_not_found", "lora_name")
                target = {k: v for k, v in before.items() if k != name}
            failure = await self._roll_out(target)
            if failure is None:
                replicas = len(set(self.acks[self.version]) & set(self._live()))
                log.info("adapter %s %r applied on %d replica(s) (version %d)", op, name, replicas, self.version)
                return {"status": 200, "body": {"lora_name": name, "status": "loaded" if op == "load" else "unloaded",
                                                "replicas": replicas, "version": self.version}}
            rollback = await self._roll_out(before)
            if rollback is not None:
                log.error("adapter %s %r failed and its rollback failed too: %s", op, name, rollback)
                failure["body"]["error"]["message"] += f" (rolling back also failed: {_message(rollback)})"
            return failure

    async def _roll_out(self, target: dict) -> dict | None:
        """Publish `target` as a new version; wait for every live replica. -> None, or the first failure."""
        self.version += 1
        version = self.version
        self.desired = target
        self.acks[version] = {}
        async with self.changed:
            self.changed.notify_all()
        deadline = time.monotonic() + self.apply_timeout
        while True:
            acks = self.acks[version]
            waiting = [rid for rid in self._live() if rid not in acks]
            failed = [o for o in acks.values() if not o["ok"]]
            if not waiting:
                return failed[0] if failed else None
            if time.monotonic() > deadline:
                return _error(503, f"replica(s) {', '.join(waiting)} did not apply the change within "
                              f"{self.apply_timeout:g}s", "adapter_apply_timeout")
            await asyncio.sleep(0.05)

    async def snapshot(self) -> dict:
        live = self._live()
        return {"version": self.version, "desired": dict(self.desired),
                "replicas": {rid: {"applied": r["applied"], "report": r.get("report", {})}
                             for rid, r in self.replicas.items() if rid in live}}


def _error(status: int, message: str, code: str, param: str | None = None) -> dict:
    from .errors import ApiError

    return {"status": status, "ok": False, "body": ApiError(status, message, code=code, param=param).body()}


def _message(outcome: dict) -> str:
    return ((outcome.get("body") or {}).get("error") or {}).get("message", str(outcome))


# ------------------------------------------------------------------------------------------------- replica


class NovaReplica:
    """One Ray Serve replica: `create_app(settings)` run in-process, plus the cluster-wide routes."""

    async def __init__(self, settings):
        import httpx
        import ray
        from ray import serve

        from .app import create_app

        self.settings = settings
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # A replica is an actor process of its own: its model runs on its threads, not in a further child.
        self.app = create_app(dataclasses.replace(settings, engine="thread"))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                        timeout=None)
        await self._wait_until_healthy()
        self.coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
        self.managed: dict[str, str] = {}  # adapters this replica loaded for the coordinator
        state = await self.coordinator.register.remote(self.replica_id)
        outcome = await self._reconcile(state["desired"])
        if not outcome["ok"]:
            raise RuntimeError(f"replica could not load the cluster's adapters: {_message(outcome)}")
        self.applied = state["version"]
        await self.coordinator.ack.remote(self.replica_id, self.applied, outcome)
        self._tasks = [asyncio.ensure_future(self._follow()), asyncio.ensure_future(self._heartbeat())]
        log.info("replica %s ready (adapters version %d)", self.replica_id, self.applied)

    async def _wait_until_healthy(self) -> None:
        while True:
            response = await self.client.get("/health")
            if response.status_code == 200:
                return
            if response.json().get("error", {}).get("code") == "model_load_failed":
                raise RuntimeError(response.json()["error"]["message"])
            await asyncio.sleep(0.2)

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model broke or that lost the coordinator is replaced."""
        for task in self._tasks:
            if task.done():
                raise RuntimeError(f"replica background task ended: {task.exception()!r}")
        response = await self.client.get("/health")
        if response.status_code != 200:
            raise RuntimeError(f"/health answered {response.status_code}: {response.text[:200]}")

    # ---- requests

    async def __call__(self, request):
        from starlette.responses import Response

        path, method = request.url.path, request.method
        if method == "POST" and path in ADMIN_ROUTES:
            response = await self._admin_change(request, ADMIN_ROUTES[path])
        elif method == "GET" and path == "/health":
            response = await self._health(request)
        elif method == "GET" and path == "/metrics":
            response = Response(await self._metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
        else:
            response = await self._forward(request)
        response.headers["x-nova-replica"] = self.replica_id  # which replica answered (logs, debugging)
        return response

    async def _forward(self, request, body: bytes | None = None):
        response = await self._local(request.method, request.url.path, request.url.query, request.headers,
                                     await request.body() if body is None else body)
        return _to_starlette(response)

    async def _local(self, method: str, path: str, query: str = "", headers=None, body: bytes = b""):
        keep = {k: v for k, v in (headers or {}).items() if k.lower() not in ("host", "content-length")}
        url = path + (f"?{query}" if query else "")
        return await self.client.request(method, url, headers=keep, content=body)

    async def _admin(self, path: str, payload: dict):
        """This replica's own admin route, with the server's admin key (for reconciling)."""
        headers = {"authorization": f"Bearer {self.settings.admin_api_key}"} if self.settings.admin_api_key else {}
        return await self._local("POST", path, headers=headers, body=json.dumps(payload).encode())

    async def _admin_change(self, request, op: str):
        from starlette.responses import JSONResponse

        from .errors import bad_request

        auth = await self._local("GET", "/v1/internal/lora", headers=request.headers)
        if auth.status_code != 200:  # lora disabled, no/invalid admin key, model not ready: answered as is
            return _to_starlette(auth)
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return bad_request("request body is not valid JSON", code="invalid_json").response()
        name = payload.get("lora_name") if isinstance(payload, dict) else None
        path = payload.get("lora_path") if op == "load" else None
        if not isinstance(name, str) or (op == "load" and not isinstance(path, str)):
            # the app's own validation gives the exact message
            return await self._forward(request, body)
        result = await self.coordinator.change.remote(op, name, path)
        return JSONResponse(result["body"], status_code=result["status"])

    async def _health(self, request):
        from starlette.responses import JSONResponse

        local = await self._local("GET", "/health", headers=request.headers)
        if local.status_code != 200:
            return _to_starlette(local)
        snapshot = await self.coordinator.snapshot.remote()
        replicas = {rid: {"adapters_version": r["applied"], "healthy": r["report"].get("healthy", False)}
                    for rid, r in snapshot["replicas"].items()}
        return JSONResponse({**local.json(), "replica": self.replica_id, "replicas": replicas,
                             "replicas_live": len(replicas), "adapters_version": snapshot["version"],
                             "adapters": sorted(snapshot["desired"])})

    async def _metrics(self) -> str:
        own = (await self.client.get("/metrics")).text
        snapshot = await self.coordinator.snapshot.remote()
        texts = {rid: r["report"].get("metrics", "") for rid, r in snapshot["replicas"].items()}
        texts[self.replica_id] = own
        return merge_metrics(texts)

    # ---- following the coordinator

    async def _reconcile(self, desired: dict) -> dict:
        """Make this replica's run-time adapters equal `desired`, through its own admin routes."""
        for name in [n for n, p in self.managed.items() if desired.get(n) != p]:
            response = await self._admin("/v1/internal/lora/unload", {"lora_name": name})
            if response.status_code != 200:
                return _outcome(response, self.replica_id)
            del self.managed[name]
        for name, path in desired.items():
            if name in self.managed:
                continue
            response = await self._admin("/v1/internal/lora/load", {"lora_name": name, "lora_path": path})
            if response.status_code != 200:
                return _outcome(response, self.replica_id)
            self.managed[name] = path
        return {"ok": True}

    async def _follow(self) -> None:
        while True:
            try:
                state = await self.coordinator.poll.remote(self.replica_id, self.applied)
                if state["version"] != self.applied:
                    outcome = await self._reconcile(state["desired"])
                    self.applied = state["version"]
                    await self.coordinator.ack.remote(self.replica_id, state["version"], outcome)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the coordinator restarting must not end the replica
                log.exception("following the adapter coordinator failed; retrying")
                await asyncio.sleep(1.0)

    async def _heartbeat(self) -> None:
        while True:
            try:
                healthy = (await self.client.get("/health")).status_code == 200
                metrics = (await self.client.get("/metrics")).text
                await self.coordinator.heartbeat.remote(self.replica_id, {"healthy": healthy, "metrics": metrics})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("heartbeat to the adapter coordinator failed")
            await asyncio.sleep(HEARTBEAT_S)

    async def __del__(self):
        for task in getattr(self, "_tasks", []):
            task.cancel()
        if hasattr(self, "_lifespan"):
            await self._lifespan.__aexit__(None, None, None)


def _outcome(response, replica_id: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:500], "type": "server_error", "param": None, "code": None}}
    if isinstance(body.get("error"), dict):
        body["error"]["message"] = f"replica {replica_id}: {body['error'].get('message')}"
    return {"ok": False, "status": response.status_code, "body": body}


def _to_starlette(response):
    from starlette.responses import Response

    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    return Response(response.content, status_code=response.status_code, headers=headers)


# ------------------------------------------------------------------------------------------------- metrics


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas -> one text, every sample labelled `replica`, grouped by family."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            entry = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                entry[2].append(f"{sample.name}{{{rendered}}} {floatToGoString(sample.value)}")
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *samples]
    lines.append(f"# HELP nova_ray_replicas replicas reporting to the adapter coordinator\n"
                 f"# TYPE nova_ray_replicas gauge\nnova_ray_replicas {len(texts)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# --------------------------------------------------------------------------------------------------- start


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
