"""One HTTP client for an embedding server's API (`nova serve` or any OpenAI-compatible one), shared by the
playground (`--server`) and `nova eval --endpoint`: requests with optional retries on 429/502/503/504
(honouring `Retry-After`), OpenAI's error shape read into a typed `ClientError` (status, message, the item it
names), and embeddings decoded from floats or base64 (`shape` for multi-vectors) into numpy arrays.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

RETRY_STATUSES = (429, 502, 503, 504)


class ClientError(Exception):
    """The server refused a request (`status` set) or could not be reached (`status` None)."""

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    @property
    def item_index(self) -> int | None:
        """The request item the error names (OpenAI's `param`, `input[3]...`), if any."""
        if self.param and self.param.startswith("input[") and "]" in self.param:
            head = self.param[len("input["): self.param.index("]")]
            return int(head) if head.isdigit() else None
        return None


def decode_embedding(entry: dict) -> np.ndarray:
    embedding = entry.get("embedding")
    if isinstance(embedding, str):  # base64 little-endian float32, optional shape
        array = np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
        shape = entry.get("shape")
        return array.reshape(shape) if shape else array
    return np.asarray(embedding, dtype=np.float32)


class EmbeddingsClient:
    def __init__(self, url: str, *, api_key: str | None = None, admin_api_key: str | None = None,
                 timeout: float = 120.0, retries: int = 0):
        import httpx

        base = url.rstrip("/")
        for suffix in ("/embeddings", "/v1"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.base = base
        self.api_key = api_key
        self.admin_api_key = admin_api_key or api_key
        self.retries = retries
        self._http = httpx.Client(timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, admin: bool = False, json: Any = None) -> Any:
        """The JSON answer of `method path`; ClientError for a refusal, an unreachable server or non-JSON."""
        import httpx

        key = self.admin_api_key if admin else self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        delay = 1.0
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, self.base + path, headers=headers, json=json)
            except httpx.TimeoutException as exc:
                if not last:
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
                    continue
                raise ClientError(f"the server at {self.base} did not answer in time ({exc})") from None
            except httpx.HTTPError as exc:
                if not last:
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
                    continue
                raise ClientError(f"cannot reach the embedding server at {self.base} ({type(exc).__name__}: {exc})") \
                    from None
            if response.status_code in RETRY_STATUSES and not last:
                try:
                    wait = float(response.headers.get("Retry-After") or delay)
                except ValueError:
                    wait = delay
                time.sleep(min(wait, 60))
                delay = min(delay * 2, 30)
                continue
            if response.status_code >= 400:
                raise _refusal(response)
            try:
                return response.json()
            except ValueError:
                raise ClientError(f"{self.base}{path} did not answer JSON", status=response.status_code) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def embed(self, inputs: list, *, model: str | None = None, multivector: bool = False,
              dimensions: int | None = None) -> list[np.ndarray]:
        """POST /v1/embeddings; one array per input, in input order."""
        payload: dict[str, Any] = {"input": inputs, "encoding_format": "float"}
        if model:
            payload["model"] = model
        if multivector:
            payload["return_multivector"] = True
        if dimensions and not multivector:
            payload["dimensions"] = int(dimensions)
        body = self.request("POST", "/v1/embeddings", json=payload)
        data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
        if len(data) != len(inputs):
            raise ClientError(f"the server returned {len(data)} embeddings for {len(inputs)} inputs")
        return [decode_embedding(entry) for entry in data]

    def models(self) -> dict:
        return self.request("GET", "/v1/models")


def _refusal(response) -> ClientError:
    try:
        error = response.json()["error"]
        message, param, code = error["message"], error.get("param"), error.get("code")
    except (ValueError, KeyError, TypeError):  # not OpenAI's error shape
        message, param, code = response.text[:300], None, None
    return ClientError(f"the server answered {response.status_code}: {message}", status=response.status_code,
                       param=param, code=code)
