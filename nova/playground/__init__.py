"""Helpers behind the Gradio playground (`app.py`): backends, scoring and rendering.

Kept separate from the model and server code: everything here reaches the model through
`nova.loading.load_model()` and its public methods, or a `nova serve` URL through its HTTP API.
"""
