"""One Ray Serve replica: the server's app (`create_app`) run in-process, plus the cluster-wide routes (adapter
changes through the coordinator, the cluster's /health and /metrics)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from .. import error_codes as codes
from .coordinator import COORDINATOR, NAMESPACE, outcome_message
from .metrics import merge_metrics

log = logging.getLogger("serve.ray")

HEARTBEAT_S = 1.0  # replicas report to the coordinator this often
ADMIN_ROUTES = {"/v1/internal/lora/load": "load", "/v1/internal/lora/unload": "unload"}


class NovaReplica:
    """One Ray Serve replica: `create_app(settings)` run in-process, plus the cluster-wide routes."""

    async def __init__(self, settings):
        import httpx
        import ray
        from ray import serve

        from ..app import create_app

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
            raise RuntimeError(f"replica could not load the cluster's adapters: {outcome_message(outcome)}")
        self.applied = state["version"]
        await self.coordinator.ack.remote(self.replica_id, self.applied, outcome)
        self._tasks = [asyncio.ensure_future(self._follow()), asyncio.ensure_future(self._heartbeat())]
        log.info("replica %s ready (adapters version %d)", self.replica_id, self.applied)

    async def _wait_until_healthy(self) -> None:
        while True:
            response = await self.client.get("/health")
            if response.status_code == 200:
                return
            if response.json().get("error", {}).get("code") == codes.MODEL_LOAD_FAILED:
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

        from ..errors import bad_request

        auth = await self._local("GET", "/v1/internal/lora", headers=request.headers)
        if auth.status_code != 200:  # lora disabled, no/invalid admin key, model not ready: answered as is
            return _to_starlette(auth)
        body = await request.body()
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return bad_request("request body is not valid JSON", code=codes.INVALID_JSON).response()
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
