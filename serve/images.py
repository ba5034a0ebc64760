"""Images from clients: sources, URL policy (SSRF-safe fetching) and bounded decoding.

Policy (image URLs are fetched only when enabled, from public addresses, within size and time limits):
- an image is a base64 string, a `data:` URL, or (only with --allow-image-urls) an http(s) URL;
- local paths and `file:` URLs are never read on a client's behalf;
- URLs: allowlisted host, every resolved address must be public (no private, loopback, link-local,
  multicast, reserved, shared or unspecified address), and the connection goes to the checked address
  (no second DNS lookup an attacker could rebind), redirects are re-checked hop by hop, body size and
  total time are bounded, no proxies from the environment, no transparent decompression;
- decoding: a few raster formats only, pixel count checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

# One definition of "a public address", and one of image bytes and their decoding, for the server and the
# in-process API (modules of the model's remote code that import nothing else of it).
from fetching_nova_embeddings_v1 import address_is_public as ip_is_public
from inputs_nova_embeddings_v1 import ImageRefused, base64_bytes, data_url_bytes, open_image

from . import error_codes as codes

MAX_REDIRECTS = 3


class ImageError(ValueError):
    """A refused or undecodable image; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400, code: str = codes.INVALID_IMAGE):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class ImagePolicy:
    allow_urls: bool = False
    allowlist: list[str] = field(default_factory=list)
    max_bytes: int = 10_000_000
    timeout: float = 10.0
    max_pixels: int = 40_000_000


# ---------------------------------------------------------------- sources


def classify_source(value: str) -> tuple[str, object]:
    """("url", url) for http(s) URLs, ("bytes", data) for data: URLs and base64 (the model's one base64 rule);
    ImageError otherwise."""
    stripped = value.strip()
    lowered = stripped[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return "url", stripped
    if lowered.startswith("data:"):
        return "bytes", _refused_as_image_error(data_url_bytes, stripped)
    if lowered.startswith("file:"):
        raise ImageError("file: URLs are never read; send the image bytes as base64 or a data: URL",
                         code=codes.IMAGE_SOURCE_REFUSED)
    scheme = urlsplit(stripped).scheme
    if scheme and len(scheme) > 1 and "://" in stripped[:32]:
        raise ImageError(f"unsupported image URL scheme {scheme!r}; only http(s) URLs (when enabled), "
                         "data: URLs and base64 are accepted", code=codes.IMAGE_SOURCE_REFUSED)
    try:
        return "bytes", base64_bytes(stripped)
    except ImageRefused:
        raise ImageError(
            "image must be base64, a data: URL or an http(s) URL; local file paths are never read",
            code=codes.IMAGE_SOURCE_REFUSED,
        ) from None


def _refused_as_image_error(function, *args, **kwargs):
    """The shared image rules' refusal as the server's ImageError (413 for an image over a limit)."""
    try:
        return function(*args, **kwargs)
    except ImageRefused as exc:
        raise ImageError(str(exc), status=codes.status_of(exc.code), code=exc.code) from None


# ---------------------------------------------------------------- decoding


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Decode to an RGB PIL image; refuse unknown formats and images over `max_pixels` before decoding."""
    return _refused_as_image_error(open_image, data, max_pixels=max_pixels, max_bytes=max_bytes)


# ---------------------------------------------------------------- URL policy and fetching


def host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allowlist:
        pattern = pattern.lower().strip().rstrip(".")
        if pattern == "*":
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]:
            return True
        if host == pattern:
            return True
    return False


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class ImageFetcher:
    """Fetches image URLs under an `ImagePolicy`. `resolver`/`ip_allowed` are injectable for tests."""

    def __init__(
        self,
        policy: ImagePolicy,
        *,
        resolver: Resolver | None = None,
        ip_allowed: Callable[[str], bool] = ip_is_public,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.policy = policy
        self.resolver = resolver or system_resolve
        self.ip_allowed = ip_allowed
        self._client = httpx.AsyncClient(
            trust_env=False, follow_redirects=False, transport=transport,
            timeout=httpx.Timeout(policy.timeout), headers={"Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an acceptable URL, ImageError otherwise (no network access)."""
        if not self.policy.allow_urls:
            raise ImageError("image URLs are disabled on this server (start it with --allow-image-urls); "
                             "send the image as base64 or a data: URL", code=codes.IMAGE_URL_REFUSED)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ImageError("malformed image URL", code=codes.IMAGE_URL_REFUSED) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageError("only http(s) image URLs are fetched", code=codes.IMAGE_URL_REFUSED)
        if parts.username is not None or parts.password is not None:
            raise ImageError("image URLs with credentials are refused", code=codes.IMAGE_URL_REFUSED)
        host = (parts.hostname or "").lower()
        if not host:
            raise ImageError("image URL has no host", code=codes.IMAGE_URL_REFUSED)
        if not host_allowed(host, self.policy.allowlist):
            raise ImageError(f"image host {host!r} is not in the allowlist", code=codes.IMAGE_URL_REFUSED)
        return scheme, host, port or (443 if scheme == "https" else 80)

    async def _checked_address(self, host: str, port: int) -> str:
        try:
            addresses = await self.resolver(host, port)
        except (OSError, UnicodeError):
            raise ImageError(f"image host {host!r} does not resolve", code=codes.IMAGE_URL_REFUSED) from None
        if not addresses:
            raise ImageError(f"image host {host!r} does not resolve", code=codes.IMAGE_URL_REFUSED)
        for address in addresses:  # every address must pass: refuse mixed public/private answers
            if not self.ip_allowed(address):
                raise ImageError(
                    f"image host {host!r} resolves to a non-public address; refused",
                    code=codes.IMAGE_URL_REFUSED,
                )
        return addresses[0]

    async def fetch(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url), timeout=self.policy.timeout)
        except asyncio.TimeoutError:
            raise ImageError(f"image URL took longer than {self.policy.timeout:g}s", code=codes.IMAGE_URL_TIMEOUT) \
                from None

    async def _fetch(self, url: str) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            scheme, host, port = self.check_url(url)
            address = await self._checked_address(host, port)
            target = httpx.URL(url).copy_with(host=address)
            default_port = 443 if scheme == "https" else 80
            host_header = host if port == default_port else f"{host}:{port}"
            if ":" in host and not host.startswith("["):
                host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
            extensions = {"sni_hostname": host} if scheme == "https" else {}
            request = self._client.build_request(
                "GET", target, headers={"Host": host_header}, extensions=extensions
            )
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ImageError(f"image URL could not be fetched: {exc.__class__.__name__}",
                                 code=codes.IMAGE_URL_FAILED) from None
            try:
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location")
                    if not location:
                        raise ImageError("image URL redirected without a location", code=codes.IMAGE_URL_FAILED)
                    url = urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise ImageError(f"image URL answered HTTP {response.status_code}", code=codes.IMAGE_URL_FAILED)
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding not in ("", "identity"):
                    raise ImageError("compressed image transfers are refused", code=codes.IMAGE_URL_FAILED)
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > self.policy.max_bytes:
                    raise ImageError(f"image URL body is over {self.policy.max_bytes} bytes", status=413,
                                     code=codes.IMAGE_TOO_LARGE)
                chunks: list[bytes] = []
                total = 0
                async for chunk in response.aiter_raw():
                    total += len(chunk)
                    if total > self.policy.max_bytes:
                        raise ImageError(f"image URL body is over {self.policy.max_bytes} bytes", status=413,
                                         code=codes.IMAGE_TOO_LARGE)
                    chunks.append(chunk)
                return b"".join(chunks)
            except httpx.HTTPError as exc:
                raise ImageError(f"image URL could not be fetched: {exc.__class__.__name__}",
                                 code=codes.IMAGE_URL_FAILED) from None
            finally:
                await response.aclose()
        raise ImageError("image URL redirected too many times", code=codes.IMAGE_URL_FAILED)
