"""Embedding backends for `nova eval`: the in-process model, or any OpenAI-compatible endpoint.

Both take Nova items (``{"text", "image", "task", "adapter", "instructions"}``) and return one float32
numpy array per item: ``[dim]`` single vectors (full size, L2-normalized) or ``[n_tokens, 128]``
multi-vectors. Dimensions are applied later by the caller, so one cached corpus serves every size.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import mimetypes
import os
from pathlib import Path

import numpy as np

from .errors import UserInputError


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False, dynamic_ncols=True)


class Embedder:
    """Interface: ``identity`` (what the cache key depends on) and ``embed``."""

    identity: dict = {}

    def embed(self, items: list[dict], multivector: bool, desc: str = "Embedding") -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return dict(self.identity)


def _file_stamp(path: Path) -> dict:
    try:
        stat = path.stat()
    except OSError:
        return {}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def model_identity(model, name: str | None = None) -> dict:
    """What an in-process model's vectors depend on: its folder, weights, config and resident adapters."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    identity: dict = {"kind": "in-process", "model": name or str(path), "path": str(path)}
    folder = Path(str(path))
    if folder.is_dir():
        weights = {p.name: _file_stamp(p) for p in sorted(folder.glob("*.safetensors"))}
        config = folder / "config.json"
        identity["weights"] = weights
        if config.is_file():
            identity["config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()[:16]
        stamp = folder / ".nova-fingerprint"
        if stamp.is_file():
            identity["fingerprint"] = stamp.read_text().strip()
    identity["dtype"] = str(getattr(model, "dtype", ""))
    identity["random_weights"] = bool(getattr(getattr(model, "config", None), "nova_random_weights", False))
    adapters = {}
    for adapter_name, info in (model.list_adapters() if hasattr(model, "list_adapters") else {}).items():
        entry = {k: info.get(k) for k in ("rank", "alpha", "targets", "path")}
        adapter_path = Path(str(info.get("path") or ""))
        entry["weights"] = _file_stamp(adapter_path / "adapter_model.safetensors") if adapter_path.is_dir() else {}
        adapters[adapter_name] = entry
    identity["adapters"] = adapters
    return identity


def encoding_settings(model, max_length: int | None) -> dict:
    """Everything besides the weights that changes an in-process model's vectors: the token limit, the chat
    template, the image processor's pixel limits and patching, and the routing/prompt tables."""
    processor = getattr(model, "processor", None)
    config = getattr(model, "config", None)
    images = getattr(processor, "image_processor", None)
    image_keys = ("size", "min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size",
                  "image_mean", "image_std", "do_resize", "do_normalize", "resample")
    return {
        "max_length": max_length,
        "templates": stable_hash(getattr(processor, "templates", None)),
        "image_processor": {key: _plain(getattr(images, key, None)) for key in image_keys},
        "task_routing": getattr(config, "task_routing", None),
        "prompt_sets": getattr(config, "prompt_sets", None),
    }


def _plain(value):
    """A JSON-plain copy (transformers keeps sizes in dataclasses such as SizeDict)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return json.loads(json.dumps(value, default=str))


class InProcessEmbedder(Embedder):
    def __init__(self, model, batch_size: int = 16, show_progress: bool = True, max_length: int | None = None,
                 name: str | None = None):
        self.model = model
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.max_length = max_length
        self.name = name
        self.refresh_identity()

    @property
    def identity(self) -> dict:
        """Read at every cache lookup, so that a setting changed after construction still changes the key."""
        return {**self._model_identity, "encoding": encoding_settings(self.model, self.max_length)}

    def refresh_identity(self) -> None:
        """Re-read the model's files and adapters (after an adapter was loaded or a file changed)."""
        self._model_identity = model_identity(self.model, self.name)

    def embed(self, items: list[dict], multivector: bool, desc: str = "Embedding") -> list[np.ndarray]:
        out: list[np.ndarray] = []
        chunk = self.batch_size * 8
        with _progress(len(items), desc, self.show_progress) as bar:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                try:
                    vectors = self.model.encode(
                        part, return_multivector=multivector, batch_size=self.batch_size, show_progress=False,
                        return_numpy=True, max_length=self.max_length,
                    )
                except ValueError as exc:
                    index = getattr(exc, "index", None)
                    if index is None:
                        raise UserInputError(str(exc)) from None
                    lead = f"item {index}: "
                    message = str(exc)[len(lead):] if str(exc).startswith(lead) else str(exc)
                    raise UserInputError(f"item {index + start}: {message}") from None
                out.extend(np.asarray(v, dtype=np.float32) for v in vectors)
                bar.update(len(part))
        return out


def _image_data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    data = Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class EndpointEmbedder(Embedder):
    """POST /v1/embeddings in batches. ``api_format='nova'`` sends Nova item objects (task, adapter,
    instructions, images as data URLs, ``return_multivector``); ``'openai'`` sends plain strings, for
    servers that only speak OpenAI's schema (then variants cannot use instructions, adapters, tasks,
    images or multi-vectors)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, batch_size: int = 32,
                 timeout: float = 120.0, show_progress: bool = True, api_format: str = "nova", retries: int = 5):
        from nova.client import EmbeddingsClient

        self.client = EmbeddingsClient(url, api_key=api_key, timeout=timeout, retries=retries)
        self.base = self.client.base
        self.url = f"{self.base}/v1/embeddings"
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.api_format = api_format
        self.model = model or self._first_model()
        self.identity = {"kind": "endpoint", "url": self.url, "model": self.model, "format": api_format}

    def _first_model(self) -> str | None:
        from nova.client import ClientError

        try:
            data = self.client.models().get("data") or []
        except ClientError as exc:
            if exc.status is None:
                raise UserInputError(f"cannot reach {self.base}/v1/models: {exc}") from None
            return None
        return data[0].get("id") if data else None

    def _inputs(self, items: list[dict], multivector: bool) -> list:
        if self.api_format == "openai":
            inputs = []
            for item in items:
                extra = sorted(k for k in ("image", "instructions", "adapter") if item.get(k))
                if extra or multivector:
                    raise UserInputError(
                        "the endpoint is used in plain OpenAI form (--endpoint-format openai): variants cannot set "
                        f"{', '.join(extra) or 'multivector'}"
                    )
                inputs.append(item["text"])
            return inputs
        inputs = []
        for item in items:
            obj = {k: v for k, v in item.items() if v is not None}
            if "image" in obj:
                obj["image"] = _image_data_url(obj["image"])
            inputs.append(obj)
        return inputs

    def embed(self, items: list[dict], multivector: bool, desc: str = "Embedding") -> list[np.ndarray]:
        from nova.client import ClientError

        out: list[np.ndarray] = []
        with _progress(len(items), desc, self.show_progress) as bar:
            for start in range(0, len(items), self.batch_size):
                part = items[start : start + self.batch_size]
                try:
                    out.extend(self.client.embed(self._inputs(part, multivector), model=self.model,
                                                 multivector=multivector))
                except ClientError as exc:
                    index = exc.item_index
                    where = f"item {index + start}: " if index is not None else ""
                    raise UserInputError(f"{where}{self.url}: {exc.message}") from None
                bar.update(len(part))
        return out

    def close(self) -> None:
        self.client.close()


def api_key_from_env() -> str | None:
    return os.environ.get("NOVA_API_KEY") or os.environ.get("OPENAI_API_KEY")


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
