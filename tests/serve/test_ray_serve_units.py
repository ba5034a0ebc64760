"""`nova serve --ray` parts that need no Ray (serve/replicas/). The adapter coordinator, driven directly: a change
commits only when every live replica acknowledged it, and is rolled back everywhere when one failed."""

from __future__ import annotations

import asyncio

import pytest

from serve.replicas.coordinator import AdapterCoordinator
from serve.replicas.metrics import merge_metrics


class Replica:
    """A follower that applies desired sets as the real replica does (poll -> reconcile -> ack)."""

    def __init__(self, coordinator: AdapterCoordinator, name: str, refuse: set[str] = frozenset()):
        self.coordinator, self.name, self.refuse = coordinator, name, refuse
        self.adapters: dict[str, str] = {}
        self.applied = -1

    async def start(self) -> None:
        state = await self.coordinator.register(self.name)
        await self.apply(state)
        self.task = asyncio.ensure_future(self.follow())

    async def apply(self, state: dict) -> None:
        bad = set(state["desired"]) & self.refuse
        if bad:
            outcome = {"ok": False, "status": 400, "body": {"error": {"message": f"{self.name} refused {bad}"}}}
        else:
            self.adapters = dict(state["desired"])
            outcome = {"ok": True}
        self.applied = state["version"]
        await self.coordinator.ack(self.name, state["version"], outcome)

    async def follow(self) -> None:
        while True:
            await self.coordinator.heartbeat(self.name, {"healthy": True})
            state = await self.coordinator.poll(self.name, self.applied)
            if state["version"] != self.applied:
                await self.apply(state)


def test_change_commits_on_every_replica_or_rolls_back():
    async def scenario():
        coordinator = AdapterCoordinator(apply_timeout=10)
        a, b = Replica(coordinator, "a"), Replica(coordinator, "b", refuse={"picky"})
        await a.start()
        await b.start()
        ok = await coordinator.change("load", "mine", "mine")
        assert ok["status"] == 200 and ok["body"]["replicas"] == 2
        assert a.adapters == b.adapters == {"mine": "mine"}
        failed = await coordinator.change("load", "picky", "picky")
        assert failed["status"] == 400 and "b refused" in failed["body"]["error"]["message"]
        await asyncio.sleep(0.1)
        assert a.adapters == b.adapters == {"mine": "mine"}  # a had loaded it: rolled back
        assert coordinator.desired == {"mine": "mine"}
        again = await coordinator.change("load", "mine", "mine")
        assert again["status"] == 400 and again["body"]["error"]["code"] == "adapter_exists"
        late = Replica(coordinator, "late")  # a replica started later loads the same set
        await late.start()
        assert late.adapters == {"mine": "mine"}
        # a dead replica (silent past its TTL) is not waited for
        for replica in (a, b, late):
            replica.task.cancel()
        await asyncio.gather(a.task, b.task, late.task, return_exceptions=True)
        coordinator.replicas["b"]["seen"] -= 60
        coordinator.replicas["late"]["seen"] -= 60
        await a.start()
        gone = await coordinator.change("unload", "mine", None)
        assert gone["status"] == 200 and gone["body"]["replicas"] == 1 and a.adapters == {}
        a.task.cancel()

    asyncio.run(scenario())


def test_metrics_are_labelled_per_replica_and_grouped_by_family():
    text = ('# HELP nova_tokens_total tokens embedded\n# TYPE nova_tokens_total counter\n'
            'nova_tokens_total 5.0\n')
    merged = merge_metrics({"r1": text, "r2": text.replace("5.0", "7.0")})
    assert merged.count("# TYPE nova_tokens counter") == 1
    assert 'nova_tokens_total{replica="r1"} 5.0' in merged and 'nova_tokens_total{replica="r2"} 7.0' in merged
    assert "nova_ray_replicas 2" in merged


def test_ray_flags_without_ray_are_refused(run_cli):
    code, _, stderr = run_cli("serve", "--replicas", "2")
    assert code == 2 and "--replicas only apply with --ray" in stderr



def test_replica_count_or_autoscaling_bounds_and_gpus():
    import argparse

    from serve import cli
    from serve.replicas.launch import deployment_options

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)

    def options(*argv, gpus=0.0):
        return deployment_options(cli.settings_from_args(parser.parse_args(["--ray", *argv])), gpus)

    assert options("--replicas", "3")["num_replicas"] == 3
    assert options()["num_replicas"] == 1 and options()["ray_actor_options"]["num_gpus"] == 0.0
    assert options(gpus=4)["ray_actor_options"]["num_gpus"] == 1.0
    assert options("--min-replicas", "1", "--max-replicas", "4")["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4}
    for bad in (("--replicas", "2", "--max-replicas", "3"), ("--min-replicas", "3", "--max-replicas", "2"),
                ("--replicas", "0")):
        with pytest.raises(ValueError):
            options(*bad)
