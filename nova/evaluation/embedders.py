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
import time
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
                    raise UserInputError(_shift_item_index(str(exc), start)) from None
                out.extend(np.asarray(v, dtype=np.float32) for v in vectors)
                bar.update(len(part))
        return out


def _shift_item_index(message: str, offset: int) -> str:
    """``item 3: ...`` from a chunk -> ``item 3+offset: ...`` in the caller's numbering."""
    if message.startswith("item "):
        head, _, rest = message[5:].partition(":")
        if head.isdigit():
            return f"item {int(head) + offset}:{rest}"
    return message


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
        import httpx

        base = url.rstrip("/")
        for suffix in ("/embeddings", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.base = base
        self.url = f"{base}/v1/embeddings"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.api_format = api_format
        self.retries = retries
        self.model = model or self._first_model()
        self.identity = {"kind": "endpoint", "url": self.url, "model": self.model, "format": api_format}

    def _first_model(self) -> str | None:
        import httpx

        try:
            response = self.client.get(f"{self.base}/v1/models")
        except httpx.HTTPError as exc:
            raise UserInputError(f"cannot reach {self.base}/v1/models: {exc}") from None
        if response.status_code != 200:
            return None
        try:
            data = response.json().get("data") or []
        except ValueError:
            return None
        return data[0].get("id") if data else None

    def _payload(self, items: list[dict], multivector: bool) -> dict:
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
            payload: dict = {"input": inputs, "encoding_format": "float"}
        else:
            inputs = []
            for item in items:
                obj = {k: v for k, v in item.items() if v is not None}
                if "image" in obj:
                    obj["image"] = _image_data_url(obj["image"])
                inputs.append(obj)
            payload = {"input": inputs, "encoding_format": "float"}
            if multivector:
                payload["return_multivector"] = True
        if self.model:
            payload["model"] = self.model
        return payload

    def _post(self, payload: dict) -> dict:
        import httpx

        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.HTTPError as exc:
                if attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
                    continue
                raise UserInputError(f"request to {self.url} failed: {exc}") from None
            if response.status_code in (429, 502, 503, 504) and attempt < self.retries:
                retry_after = response.headers.get("Retry-After")
                try:
                    wait = float(retry_after) if retry_after else delay
                except ValueError:
                    wait = delay
                time.sleep(min(wait, 60))
                delay = min(delay * 2, 30)
                continue
            if response.status_code != 200:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:300]
                raise UserInputError(f"{self.url} answered {response.status_code}: {message}")
            try:
                return response.json()
            except ValueError:
                raise UserInputError(f"{self.url} answered with invalid JSON") from None
        raise UserInputError(f"{self.url}: gave up after {self.retries} retries")  # pragma: no cover

    def embed(self, items: list[dict], multivector: bool, desc: str = "Embedding") -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with _progress(len(items), desc, self.show_progress) as bar:
            for start in range(0, len(items), self.batch_size):
                part = items[start : start + self.batch_size]
                try:
                    body = self._post(self._payload(part, multivector))
                except UserInputError as exc:
                    raise UserInputError(_shift_item_index(str(exc), start)) from None
                data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
                if len(data) != len(part):
                    raise UserInputError(f"{self.url} returned {len(data)} embeddings for {len(part)} inputs")
                for entry in data:
                    out.append(_decode_embedding(entry))
                bar.update(len(part))
        return out

    def close(self) -> None:
        self.client.close()


def _decode_embedding(entry: dict) -> np.ndarray:
    embedding = entry.get("embedding")
    if isinstance(embedding, str):  # base64 little-endian float32, optional shape
        array = np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
        shape = entry.get("shape")
        return array.reshape(shape) if shape else array
    return np.asarray(embedding, dtype=np.float32)


def api_key_from_env() -> str | None:
    return os.environ.get("NOVA_API_KEY") or os.environ.get("OPENAI_API_KEY")


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
