"""Nova's embedding server (`nova serve`): OpenAI/Jina/Nova request forms, dynamic batching across
requests, per-item adapters, runtime adapter loading, limits, API keys, Prometheus metrics.

`serve.app.create_app(settings, model=None)` builds the Starlette app; `serve.cli` is the command line.
"""

__version__ = "1.0.0"
