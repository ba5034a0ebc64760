"""The adapter coordinator: the desired set of run-time adapters and its version, one named Ray actor that every
replica follows; a change commits only when every live replica applied it."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import error_codes as codes

COORDINATOR = "nova-adapter-coordinator"
NAMESPACE = "nova-serve"
REPLICA_TTL_S = 6.0  # a replica silent for this long is no longer waited for (it died; Serve replaces it)
POLL_S = 2.0  # long-poll timeout for adapter changes

log = logging.getLogger("serve.ray")


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
                    return outcome_error(400, f"adapter {name!r} is already loaded; unload it first", codes.ADAPTER_EXISTS,
                                  "lora_name")
                target = {**before, name: path}
            else:
                if name not in before:
                    return outcome_error(404, f"adapter {name!r} was not loaded at run time; in replicated mode only "
                                  "adapters loaded through /v1/internal/lora/load can be unloaded (loaded: "
                                  f"{', '.join(sorted(before)) or 'none'})", codes.ADAPTER_NOT_FOUND, "lora_name")
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
                failure["body"]["error"]["message"] += f" (rolling back also failed: {outcome_message(rollback)})"
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
                return outcome_error(503, f"replica(s) {', '.join(waiting)} did not apply the change within "
                              f"{self.apply_timeout:g}s", codes.ADAPTER_APPLY_TIMEOUT)
            await asyncio.sleep(0.05)

    async def snapshot(self) -> dict:
        live = self._live()
        return {"version": self.version, "desired": dict(self.desired),
                "replicas": {rid: {"applied": r["applied"], "report": r.get("report", {})}
                             for rid, r in self.replicas.items() if rid in live}}


def outcome_error(status: int, message: str, code: str, param: str | None = None) -> dict:
    from ..errors import ApiError

    return {"status": status, "ok": False, "body": ApiError(status, message, code=code, param=param).body()}


def outcome_message(outcome: dict) -> str:
    return ((outcome.get("body") or {}).get("error") or {}).get("message", str(outcome))
