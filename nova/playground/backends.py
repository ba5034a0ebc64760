"""Where embeddings come from: the model in this process, or a running `nova serve`.

Both backends take the model's item dicts (``{"task", "text", "image", "adapter", "instructions"}``,
images as PIL images) and return numpy arrays: ``[dim]`` pooled vectors or ``[n_tokens, 128]``
multi-vectors. Errors the user can fix come out as :class:`PlaygroundError` with a readable message.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np

MATRYOSHKA_DIMS = (128, 256, 512, 1024, 2048)
REPO_ROOT = Path(__file__).resolve().parents[2]


class PlaygroundError(Exception):
    """A problem the user can act on; its message is shown in the UI as is."""


class PlaygroundItemError(PlaygroundError):
    """A bad item, named by its position in the batch the backend was given (typed, never read from text)."""

    def __init__(self, index: int, message: str):
        super().__init__(f"item {index}: {message}")
        self.index = index
        self.message = message


def _item_message(exc: Exception, index: int) -> str:
    """The model's ItemError message without its `item N: ` lead (the index travels as a number)."""
    text, lead = str(exc), f"item {index}: "
    return text[len(lead):] if text.startswith(lead) else text


def _to_numpy(vector: Any) -> np.ndarray:
    if hasattr(vector, "detach"):
        vector = vector.detach().to("cpu").float().numpy()
    return np.asarray(vector, dtype=np.float32)


def _prompts_from_routing(routing: Any) -> dict[str, str]:
    """task -> prompt, read from the model's own `task_routing` (the config, or the server's /v1/models):
    the playground keeps no routing table of its own."""
    prompts = {}
    if isinstance(routing, dict):
        for task, route in routing.items():
            if isinstance(route, dict) and isinstance(route.get("prompt"), str):
                prompts[task] = route["prompt"]
    return prompts


class Backend:
    """Common interface of the two backends."""

    label = "model"
    random_weights = False
    task_prompts: dict[str, str] = {}  # from the model's task_routing; empty until known

    def encode(self, items: list[dict], *, multivector: bool, dimensions: int | None) -> list[np.ndarray]:
        raise NotImplementedError

    def list_adapters(self) -> list[str]:
        raise NotImplementedError

    can_load_adapters = False  # run-time adapter loading: off unless the operator allowed it

    def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    def refresh(self) -> str | None:
        """Re-check the model/server; returns an error message when it is not usable."""
        return None

    def tasks(self) -> list[str]:
        # before the model's table is known (a server not reached yet), the two tasks the page starts with
        return list(self.task_prompts) or ["retrieval.query", "retrieval.passage"]

    def dimension_choices(self) -> list[int]:
        """Matryoshka sizes for pooled vectors, smallest first, the full size last."""
        full = self.full_dim()
        listed = getattr(self, "_matryoshka_dims", None) or MATRYOSHKA_DIMS
        return sorted({int(d) for d in listed if int(d) < full} | {full})

    def full_dim(self) -> int:
        if getattr(self, "_full_dim", None) is None:
            self._full_dim = int(self.encode(["dimension probe"], multivector=False, dimensions=None)[0].shape[-1])
        return self._full_dim

    # -- token view -------------------------------------------------------------------------------
    def _tokenizer(self):
        raise NotImplementedError

    def token_labels(self, item: dict, n_rows: int) -> list[str] | None:
        """One label per multi-vector row of ``item``, or None when they cannot be aligned.

        The rows are the item's tokens outside the instruction turn (the instruction is context, never content). For a text item
        they are the tokens of ``{prompt}{text}``, with and without instructions (the user-turn markup of an
        instructed item is context, not a row).
        """
        if item.get("image") is not None or not isinstance(item.get("text"), str):
            return None
        tokenizer = self._tokenizer()
        if tokenizer is None:
            return None
        prompt = self.task_prompts.get(item.get("task") or "retrieval")
        if prompt is None:  # the routing table is not known: no guessed labels
            return None
        ids = tokenizer(f"{prompt}{item['text']}", add_special_tokens=False)["input_ids"]
        if len(ids) != n_rows:
            return None
        return [tokenizer.decode([i]) for i in ids]


class InProcessBackend(Backend):
    """The model loaded in this process with `nova.loading.load_model()`."""

    def __init__(self, model: Any, label: str | None = None, adapter_root: str | None = None):
        self.model = model
        self.adapter_root = adapter_root  # None: run-time adapter loading is off (a public Space's default)
        self.loaded_here: set[str] = set()  # what this playground loaded, and so may unload
        self._lock = threading.Lock()
        self._full_dim = None
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        self.label = label or str(name or type(model).__name__)
        self.random_weights = _config_says_random(config, self.label)
        self.task_prompts = _prompts_from_routing(getattr(config, "task_routing", None))
        self._matryoshka_dims = list(getattr(config, "matryoshka_dims", None) or [])

    @classmethod
    def load(cls, model_path: str | None, device: str | None = None, dtype: str | None = None,
             adapter_root: str | None = None) -> InProcessBackend:
        from nova.loading import load_model

        kwargs: dict[str, Any] = {}
        if device:
            kwargs["device"] = device
        if dtype:
            kwargs["dtype"] = dtype
        model = load_model(model_path, **kwargs)
        label = "tiny random-weight checkpoint (bundled)" if model_path is None else str(model_path)
        return cls(model, label=label, adapter_root=adapter_root)

    def encode(self, items, *, multivector, dimensions):
        try:
            with self._lock:
                out = self.model.encode(
                    list(items),
                    return_multivector=multivector,
                    dimensions=None if multivector else dimensions,
                    show_progress=False,
                )
        except ValueError as exc:
            index = getattr(exc, "index", None)
            if index is not None:
                raise PlaygroundItemError(index, _item_message(exc, index)) from exc
            raise PlaygroundError(str(exc)) from exc
        return [_to_numpy(v) for v in out]

    def list_adapters(self):
        return sorted(self.model.list_adapters())

    @property
    def can_load_adapters(self) -> bool:
        return self.adapter_root is not None

    def load_adapter(self, name, path):
        """Only from under `--adapter-root`, with the server's own confinement rule (symlinks resolved; the
        weights file of a PEFT folder names the folder)."""
        from serve.adapters import check_lora_name, resolve_lora_path
        from serve.errors import ApiError

        if self.adapter_root is None:
            raise PlaygroundError("Loading adapters at run time is off: start the playground with "
                                  "--adapter-root DIR to allow PEFT folders under DIR.")
        try:
            check_lora_name(name)
            folder = resolve_lora_path(self.adapter_root, path, root_flag="--adapter-root")
        except ApiError as exc:
            raise PlaygroundError(f"could not load adapter {name!r}: {exc.message}") from None
        try:
            with self._lock:
                self.model.load_adapter(name, folder)
        except ValueError as exc:
            raise PlaygroundError(f"could not load adapter {name!r}: {exc}") from exc
        self.loaded_here.add(name)

    def unload_adapter(self, name):
        if name not in self.loaded_here:
            raise PlaygroundError(f"{name!r} was not loaded in this playground; only adapters loaded here "
                                  f"can be unloaded ({', '.join(sorted(self.loaded_here)) or 'none so far'}).")
        with self._lock:
            self.model.unload_adapter(name)
        self.loaded_here.discard(name)

    def _tokenizer(self):
        processor = getattr(self.model, "processor", None)
        return getattr(processor, "tokenizer", None)

    def token_labels(self, item, n_rows):
        # Exact: the processor's own token ids of the multi-vector rows (its multi_mask: the item's own tokens).
        processor = getattr(self.model, "processor", None)
        tokenizer = self._tokenizer()
        if processor is not None and tokenizer is not None and hasattr(processor, "prepare_item"):
            try:
                row = processor.prepare_item(item, index=0)
                ids = np.asarray(_to_numpy(row.input_ids), dtype=np.int64).reshape(-1).tolist()
                ids = [i for i, own in zip(ids, row.multi_mask, strict=True) if own]
            except Exception:  # noqa: BLE001 - fall back to rendering the text ourselves
                ids = []
            if len(ids) == n_rows > 0:
                return [tokenizer.decode([i]) for i in ids]
        return super().token_labels(item, n_rows)


def _config_says_random(config: Any, label: str) -> bool:
    for attr in ("nova_random_weights", "random_weights", "is_random", "tiny_random"):
        if getattr(config, attr, False):
            return True
    return "tiny" in label.lower() and "random" in label.lower()


def image_to_data_url(image: Any) -> str:
    """bytes or a PIL image -> a `data:` URL (the server's image form)."""
    if isinstance(image, (bytes, bytearray)):
        data, mime = bytes(image), "application/octet-stream"
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as probe:
                mime = Image.MIME.get(probe.format or "", mime)
        except Exception:  # noqa: BLE001 - let the server say what is wrong with it
            pass
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class ServerBackend(Backend):
    """A running `nova serve`, through its OpenAI-compatible `/v1/embeddings` (Nova item form)."""

    def __init__(self, url: str, api_key: str | None = None, admin_api_key: str | None = None,
                 model: str | None = None, timeout: float = 120.0):
        from nova.client import EmbeddingsClient

        self.url = url.rstrip("/")
        self.api_key = api_key
        self._client = EmbeddingsClient(self.url, api_key=api_key, admin_api_key=admin_api_key, timeout=timeout)
        self._admin_key_given = bool(admin_api_key)
        self.loaded_here: set[str] = set()
        self._model = model
        self._full_dim = None
        self._tok = None
        self._served_adapters: list[str] = []
        self.label = f"{model or 'model'} @ {self.url}"
        self.random_weights = False
        self.models_info: dict[str, Any] = {}
        try:
            self._discover()
        except PlaygroundError:
            pass  # reported on first use; the UI still comes up

    # -- HTTP (nova.client: the one client of this API) ------------------------------------------
    def _request(self, method: str, path: str, admin: bool = False, json: Any = None) -> Any:
        from nova.client import ClientError

        try:
            return self._client.request(method, path, admin=admin, json=json)
        except ClientError as exc:
            raise _playground_error(exc) from None

    def _discover(self) -> None:
        info = self._request("GET", "/v1/models")
        models = info.get("data") or []
        primary = [m for m in models if not m.get("parent")] or models
        self._served_adapters = [str(m["id"]) for m in models if m.get("parent") and m.get("id")]
        if primary:
            self.models_info = primary[0]
            self.task_prompts = _prompts_from_routing(primary[0].get("task_routing"))
            self._matryoshka_dims = list(primary[0].get("matryoshka_dims") or [])
            if self._model is None:
                self._model = primary[0].get("id")
        self.label = f"{self._model or 'model'} @ {self.url}"
        self.random_weights = _mentions_random(info)
        if not self.random_weights:
            try:
                self.random_weights = _mentions_random(self._request("GET", "/health"))
            except PlaygroundError:
                pass

    # -- Backend --------------------------------------------------------------------------------
    def refresh(self):
        try:
            self._discover()
        except PlaygroundError as exc:
            return str(exc)
        return None

    def encode(self, items, *, multivector, dimensions):
        from nova.client import ClientError

        if self._model is None:
            self._discover()
        try:
            return self._client.embed([self._wire_item(item) for item in items], model=self._model,
                                      multivector=bool(multivector), dimensions=dimensions)
        except ClientError as exc:
            if exc.item_index is not None:
                raise PlaygroundItemError(exc.item_index, exc.message) from None
            raise _playground_error(exc) from None

    @staticmethod
    def _wire_item(item: Any) -> Any:
        if isinstance(item, str):
            return {"text": item}
        out = {k: v for k, v in item.items() if v is not None}
        image = out.get("image")
        if image is not None and (isinstance(image, (bytes, bytearray)) or hasattr(image, "save")):
            out["image"] = image_to_data_url(image)
        return out

    def list_adapters(self):
        # The admin route lists every adapter; without the admin key (or --enable-lora) the adapters
        # appear in /v1/models as models whose parent is the base model (vLLM's convention).
        try:
            return sorted(_adapter_names(self._request("GET", "/v1/internal/lora", admin=True)))
        except PlaygroundError:
            pass
        try:
            self._discover()
        except PlaygroundError:
            return []
        return sorted(self._served_adapters)

    @property
    def can_load_adapters(self) -> bool:
        """With the admin key; the server confines paths to its own --lora-root."""
        return self._admin_key_given

    def load_adapter(self, name, path):
        if not self.can_load_adapters:
            raise PlaygroundError("Loading adapters at run time is off: the playground has no admin key for "
                                  "the server (--admin-api-key).")
        self._request("POST", "/v1/internal/lora/load", admin=True, json={"lora_name": name, "lora_path": path})
        self.loaded_here.add(name)

    def unload_adapter(self, name):
        if name not in self.loaded_here:
            raise PlaygroundError(f"{name!r} was not loaded in this playground; only adapters loaded here "
                                  f"can be unloaded ({', '.join(sorted(self.loaded_here)) or 'none so far'}).")
        self._request("POST", "/v1/internal/lora/unload", admin=True, json={"lora_name": name})
        self.loaded_here.discard(name)

    def _tokenizer(self):
        if self._tok is None:
            try:
                from transformers import AutoTokenizer
                from transformers.utils import logging as hf_logging

                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
                try:
                    # the Qwen2.5-VL tokenizer files shipped at the repository root
                    self._tok = AutoTokenizer.from_pretrained(str(REPO_ROOT))
                finally:
                    hf_logging.set_verbosity(verbosity)
            except Exception:  # noqa: BLE001 - no tokenizer, no token labels
                self._tok = False
        return self._tok or None


def _playground_error(exc) -> PlaygroundError:
    message = exc.message[:1].upper() + exc.message[1:]
    if exc.status is None and message.startswith("Cannot reach"):
        message += ". Is `nova serve` running there?"
    return PlaygroundError(message)


def _adapter_names(body: Any) -> list[str]:
    if isinstance(body, dict):
        for key in ("data", "adapters", "loras"):
            if key in body:
                return _adapter_names(body[key])
        return [str(k) for k in body]
    names = []
    for entry in body or []:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, dict):
            name = entry.get("name") or entry.get("lora_name") or entry.get("id")
            if name:
                names.append(str(name))
    return names


def _mentions_random(info: Any) -> bool:
    if isinstance(info, dict):
        for key, value in info.items():
            if "random" in str(key).lower() and value is True:
                return True
            if _mentions_random(value):
                return True
    elif isinstance(info, list):
        return any(_mentions_random(v) for v in info)
    elif isinstance(info, str):
        return "random weight" in info.lower() or "random-weight" in info.lower()
    return False
