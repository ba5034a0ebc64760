"""The guarded image-URL fetcher of the in-process API (`encode` / `encode_image` take http(s) URLs as Jina V4
does). Synchronous, standard library only, so it travels with the remote code.

Guards: http(s) only, no credentials in the URL; the host is resolved once and EVERY address must be public
(no private, loopback, link-local, multicast, reserved or unspecified address, also when embedded in IPv6);
the connection goes to that checked address (no second DNS lookup an attacker could rebind), with the
hostname kept for the Host header and TLS; redirects are re-checked hop by hop; a size cap and a deadline
bound the transfer. Decoding (and its decompression-bomb checks) stays with the processor.

A server never uses this: it keeps its own URL policy and hands the model bytes only.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(ValueError):
    """A URL that was refused or could not be fetched; the message says which and why."""


def address_is_public(address: str) -> bool:
    """Globally routable unicast only; IPv6 forms that embed an IPv4 address are judged by that address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return address_is_public(str(inner))
    blocked = (ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved, ip.is_unspecified)
    return ip.is_global and not any(blocked)


def resolve_host(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def open_tcp(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout)


class UrlFetcher:
    """`fetch(url) -> bytes` under the guards above. `address_allowed` and `connect` are the test hooks: a
    test that serves an image on loopback passes a policy allowing exactly that, and a transport that cannot
    reach anything but loopback, so a regressed guard still sends no traffic off the machine."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        timeout: float = DEFAULT_TIMEOUT_S,
        address_allowed: Callable[[str], bool] = address_is_public,
        resolve: Callable[[str, int], list[str]] = resolve_host,
        connect: Callable[[str, int, float], socket.socket] = open_tcp,
    ):
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.address_allowed = address_allowed
        self.resolve = resolve
        self.connect = connect

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            scheme, host, port = self._check_url(url)
            address = self._checked_address(host, port)
            status, location, body = self._get(scheme, host, port, address, url, deadline)
            if status not in _REDIRECTS:
                if status != 200:
                    raise FetchError(f"image URL answered HTTP {status}")
                return body
            if not location:
                raise FetchError("image URL redirected without a Location")
            url = urljoin(url, location)
        raise FetchError(f"image URL redirected more than {MAX_REDIRECTS} times")

    @staticmethod
    def _check_url(url: str) -> tuple[str, str, int]:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise FetchError("malformed image URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"only http(s) image URLs are fetched, not {scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise FetchError("image URLs with credentials are refused")
        if not parts.hostname:
            raise FetchError("image URL has no host")
        return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)

    def _checked_address(self, host: str, port: int) -> str:
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError):
            raise FetchError(f"image host {host!r} does not resolve") from None
        if not addresses:
            raise FetchError(f"image host {host!r} does not resolve")
        refused = [a for a in addresses if not self.address_allowed(a)]
        if refused:  # every answer must pass: a mix of public and private answers is refused
            raise FetchError(f"image host {host!r} resolves to a non-public address ({refused[0]}); refused")
        return addresses[0]

    def _get(self, scheme, host, port, address, url, deadline) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"image URL took longer than {self.timeout:g}s")
        kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = kind(host, port, address=address, connect=self.connect, timeout=remaining)
        try:
            conn.request("GET", path, headers={"Accept-Encoding": "identity", "User-Agent": "nova-embeddings"})
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                return response.status, response.getheader("Location"), b""
            if response.getheader("Content-Encoding", "identity").lower() not in ("", "identity"):
                raise FetchError("compressed image transfers are refused")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise FetchError(f"image URL body is over {self.max_bytes} bytes")
            chunks, total = [], 0
            while chunk := response.read(65536):
                total += len(chunk)
                if total > self.max_bytes:
                    raise FetchError(f"image URL body is over {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"image URL took longer than {self.timeout:g}s")
                chunks.append(chunk)
            return response.status, None, b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"image URL could not be fetched ({type(exc).__name__}: {exc})") from None
        finally:
            conn.close()


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the checked address, while Host (and for HTTPS, SNI and the certificate) name the host."""

    def __init__(self, host, port, *, address, connect, timeout):
        super().__init__(host, port, timeout=timeout)
        self._address, self._connect = address, connect

    def connect(self):
        self.sock = self._connect(self._address, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, *, address, connect, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address, self._connect = address, connect

    def connect(self):
        sock = self._connect(self._address, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


__all__ = ["UrlFetcher", "FetchError", "address_is_public"]
