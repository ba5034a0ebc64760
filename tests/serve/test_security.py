"""Image security: SSRF attempts (loopback, link-local metadata, private, encoded IPs, file:, local paths,
other schemes, credentials, redirects to private hosts) and decompression bombs are refused; the fetcher
connects to the address it checked; size and time limits hold."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading
import time

import httpx
import pytest
from PIL import Image
from serve_helpers import (
    LoopbackOnlyBackend,
    assert_close,
    assert_error,
    decode_embedding,
    make_png,
    reference,
)

from serve.images import ImageError, ImageFetcher, ImagePolicy, decode_image, host_allowed, ip_is_public

PNG = make_png(width=64, height=64, seed=11)


class ImageHandler(http.server.BaseHTTPRequestHandler):
    hits: list[tuple[str, str]] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        ImageHandler.hits.append((self.path, self.headers.get("Host", "")))
        if self.path == "/ok.png":
            self._send(PNG)
        elif self.path == "/big":
            self._send(b"\x89PNG" + b"\x00" * 2_000_000)
        elif self.path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(40):
                chunk = b"\x00" * 65536
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://internal.test/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(2)
            self._send(PNG)
        elif self.path == "/gzip":
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"abcd")
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the fetcher gave up (timeout test)
            pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(allow_image_urls=True, image_url_allowlist=["*"], max_image_pixels=4_000_000,
                        image_url_timeout=1.0)


def embed(server, image):
    return httpx.post(server.url + "/v1/embeddings", json={"input": ["ok", {"image": image}]}, timeout=30)


@pytest.mark.parametrize("template", [
    "http://127.0.0.1:{port}/ok.png",
    "http://localhost:{port}/ok.png",
    "http://[::1]:{port}/ok.png",
    "http://[::ffff:127.0.0.1]:{port}/ok.png",
    "http://2130706433:{port}/ok.png",
    "http://0x7f.1:{port}/ok.png",
    "http://0.0.0.0:{port}/ok.png",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[fe80::1]/x.png",
    "http://10.0.0.1/x.png",
    "http://192.168.1.1/x.png",
    "http://100.64.0.1/x.png",
    "https://127.0.0.1:{port}/ok.png",
])
def test_ssrf_to_non_public_addresses_is_refused_without_connecting(server, image_host, template):
    before = len(ImageHandler.hits)
    response = embed(server, template.format(port=image_host))
    assert_error(response, 400, "image_url_refused", "input[1].image")
    assert len(ImageHandler.hits) == before  # nothing ever reached the internal host
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_local_files_and_other_schemes_are_never_read(server, tmp_path):
    png_path = tmp_path / "secret.png"
    png_path.write_bytes(PNG)
    for source, code in [
        ("file:///etc/passwd", "image_source_refused"),
        (f"file://{png_path}", "image_source_refused"),
        (str(png_path), "image_source_refused"),
        ("/etc/passwd", "image_source_refused"),
        ("../../../../etc/hosts", "image_source_refused"),
        ("ftp://example.com/a.png", "image_source_refused"),
        ("gopher://127.0.0.1:70/_x", "image_source_refused"),
        ("http://user:pw@example.com/a.png", "image_url_refused"),
    ]:
        assert_error(embed(server, source), 400, code, "input[1].image")


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bomb_refused(server):
    # 225 Mpx (past PIL's own bomb guard) and 64 Mpx (past the server's --max-image-pixels): both are a
    # few kB on the wire and both are refused from the header, before any pixel is decoded.
    for bomb in (_png(15_000, 15_000), _png(8_000, 8_000)):
        encoded = base64.b64encode(bomb).decode()
        assert len(encoded) < 200_000
        for source in (encoded, "data:image/png;base64," + encoded):
            assert_error(embed(server, source), 413, "image_too_large", "input[1].image")
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(bomb, max_pixels=40_000_000)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "fine"}).status_code == 200


def test_image_url_end_to_end_with_pinned_resolution(server, image_host, tiny_model):
    # Route "images.test" to the local host and allow that one address: the only test-only wiring.
    state = server.state
    policy = ImagePolicy(allow_urls=True, allowlist=["images.test"], max_bytes=1_000_000, timeout=2.0)
    original = state.fetcher
    fetcher = ImageFetcher(policy, resolver=_resolver, ip_allowed=lambda ip: ip == "127.0.0.1" or ip_is_public(ip))
    state.fetcher = fetcher
    try:
        response = embed(server, f"http://images.test:{image_host}/ok.png")
        assert response.status_code == 200, response.text
        want = reference(tiny_model, {"task": "retrieval", "image": base64.b64encode(PNG).decode()})
        assert_close(decode_embedding(response.json()["data"][1]), want)
        assert ImageHandler.hits[-1] == ("/ok.png", f"images.test:{image_host}")
        assert_error(embed(server, f"http://other.test:{image_host}/ok.png"), 400, "image_url_refused")
    finally:
        state.fetcher = original


async def _resolver(host: str, port: int) -> list[str]:
    table = {"images.test": ["127.0.0.1"], "internal.test": ["10.1.2.3"], "mixed.test": ["8.8.8.8", "10.0.0.7"]}
    if host not in table:
        raise OSError("no such host")
    return table[host]


def test_fetcher_limits(image_host):
    calls: list[str] = []

    async def counting_resolver(host, port):
        calls.append(host)
        return await _resolver(host, port)

    async def main():
        policy = ImagePolicy(allow_urls=True, allowlist=["*.test"], max_bytes=1_000_000, timeout=0.5)
        fetcher = ImageFetcher(policy, resolver=counting_resolver,
                               ip_allowed=lambda ip: ip == "127.0.0.1" or ip_is_public(ip))
        base = f"http://images.test:{image_host}"
        try:
            assert await fetcher.fetch(base + "/ok.png") == PNG
            assert calls == ["images.test"]  # one resolution per hop: no second lookup to rebind
            outcomes = {}
            for path in ("/big", "/chunked-big", "/redirect-private", "/slow", "/gzip", "/missing"):
                try:
                    await fetcher.fetch(base + path)
                    outcomes[path] = "fetched"
                except ImageError as exc:
                    outcomes[path] = (exc.status, exc.code)
            for url in ("http://mixed.test/x.png", "http://nowhere.test/x.png", "http://images.example/x.png"):
                try:
                    await fetcher.fetch(url)
                    outcomes[url] = "fetched"
                except ImageError as exc:
                    outcomes[url] = (exc.status, exc.code)
            return outcomes
        finally:
            await fetcher.aclose()

    outcomes = asyncio.run(main())
    assert outcomes == {
        "/big": (413, "image_too_large"),
        "/chunked-big": (413, "image_too_large"),
        "/redirect-private": (400, "image_url_refused"),
        "/slow": (400, "image_url_timeout"),
        "/gzip": (400, "image_url_failed"),
        "/missing": (400, "image_url_failed"),
        "http://mixed.test/x.png": (400, "image_url_refused"),
        "http://nowhere.test/x.png": (400, "image_url_refused"),
        "http://images.example/x.png": (400, "image_url_refused"),
    }


def test_fetches_cannot_leave_the_machine_even_with_the_guard_off():
    """The tests' own safety net (tests/serve/conftest.py): with the address guard switched off entirely, a
    URL that resolves to a private address is still never connected to; loopback still works."""
    async def main():
        policy = ImagePolicy(allow_urls=True, allowlist=["*"], max_bytes=1_000_000, timeout=2.0)
        fetcher = ImageFetcher(policy, resolver=_resolver, ip_allowed=lambda ip: True)  # a regressed guard
        try:
            with pytest.raises(ImageError) as refused:
                await fetcher.fetch("http://internal.test/x.png")
            return refused.value
        finally:
            await fetcher.aclose()

    before = len(LoopbackOnlyBackend.refused)
    error = asyncio.run(main())
    assert error.code == "image_url_failed"
    assert LoopbackOnlyBackend.refused[before:] == [("10.1.2.3", 80)]


def test_url_policy_helpers():
    assert host_allowed("img.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("evil-example.com", ["*.example.com"])
    assert host_allowed("cdn.example.org", ["cdn.example.org"])
    assert host_allowed("anything.net", ["*"])
    for address in ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "0.0.0.0",
                    "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1",
                    "2002:7f00:1::1", "224.0.0.1", "255.255.255.255", "not-an-ip"]:
        assert not ip_is_public(address), address
    for address in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]:
        assert ip_is_public(address), address
    with pytest.raises(ImageError, match="disabled"):
        ImageFetcher(ImagePolicy()).check_url("https://example.com/a.png")
