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

The parts: `coordinator.py` (the desired adapter set, one named actor), `replica.py` (one replica),
`metrics.py` (the cluster's /metrics), `launch.py` (deployment options, start, stop).
"""
