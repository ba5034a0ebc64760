"""In-process image URLs (Jina V4's `encode_image("https://...")`), through the guarded fetcher.

No test here can send traffic off this machine, even if the guard regressed: every fetcher is given a
`connect` transport that only reaches loopback (or refuses everything), and every host is an IP literal,
so there is no DNS lookup either.
"""

import http.server
import io
import ipaddress
import sys
import threading

import pytest


def fetching(model):
    """The fetcher module of the remote code this model was loaded with (each directory is its own module)."""
    return sys.modules[type(model.processor).__module__.replace("processing_", "fetching_")]


def loopback_only(address: str) -> bool:
    """The test hook: allow loopback, which the default guard refuses."""
    return ipaddress.ip_address(address).is_loopback


def loopback_transport(address, port, timeout):
    assert ipaddress.ip_address(address).is_loopback, f"test transport refused {address}"
    import socket

    return socket.create_connection((address, port), timeout=timeout)


def no_transport(address, port, timeout):
    raise AssertionError(f"the guard let a connection to {address}:{port} through")


@pytest.fixture
def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def server(png):
    """A real HTTP server on 127.0.0.1: /x.png, /big (over the size cap), /redirect-private, /404."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append((self.path, self.headers.get("Host")))
            if self.path == "/x.png":
                self._send(200, png)
            elif self.path == "/big":
                self._send(200, b"\0" * 5000)
            elif self.path == "/redirect-private":
                self.send_response(302)
                self.send_header("Location", "http://10.0.0.1/x.png")
                self.end_headers()
            elif self.path == "/redirect-ok":
                self.send_response(302)
                self.send_header("Location", "/x.png")
                self.end_headers()
            else:
                self._send(404, b"no")

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def model_fetching_loopback(fresh_model):
    fresh_model.processor.url_fetcher = fetching(fresh_model).UrlFetcher(address_allowed=loopback_only,
                                                              connect=loopback_transport, max_bytes=4096)
    return fresh_model


def test_encode_and_encode_image_fetch_urls_like_bytes(model_fetching_loopback, server, png, image):
    url, hits = server
    model = model_fetching_loopback
    model.processor.url_fetcher.max_bytes = len(png) + 1
    by_url = model.encode([{"image": url + "/x.png"}, {"image": url + "/redirect-ok", "text": "chart"}])
    by_bytes = model.encode([{"image": png}, {"image": png, "text": "chart"}])
    for a, b in zip(by_url, by_bytes, strict=True):
        assert float(a @ b) > 0.99999
    jina_style = model.encode_image(url + "/x.png", task="retrieval")
    assert float(jina_style @ model.encode_image(image, task="retrieval")) > 0.99999
    assert ("/x.png", url.removeprefix("http://")) in hits  # Host names the host, though we dial the address


def test_fetch_limits_and_redirects_are_item_errors(model_fetching_loopback, server):
    url, _ = server
    model = model_fetching_loopback
    cases = [("/big", "image URL body is over 4096 bytes"), ("/404", "image URL answered HTTP 404"),
             ("/redirect-private", "image host .10.0.0.1. resolves to a non-public address \\(10.0.0.1\\)")]
    for path, message in cases:
        with pytest.raises(ValueError, match=f"item 1: {message}"):
            model.encode(["ok", {"image": url + path}])
    with pytest.raises(ValueError, match="item 0: only http\\(s\\) image URLs"):
        model.encode([{"image": "ftp://127.0.0.1/x.png"}])
    model.config.max_image_pixels = 5000  # the decompression-bomb check applies to fetched images too
    model.processor.url_fetcher.max_bytes = 10**6
    with pytest.raises(ValueError, match="item 0: image is 120x80 = 9600 pixels, over the limit of 5000"):
        model.encode([{"image": url + "/x.png"}])


NON_PUBLIC = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
              "[::1]", "[::ffff:127.0.0.1]", "[fe80::1]", "[fc00::1]", "100.64.0.1", "240.0.0.1"]


def test_default_guard_refuses_non_public_addresses_without_connecting(fresh_model):
    fetcher = fresh_model.processor.url_fetcher  # the default guard, as `encode` uses it
    assert fetcher.address_allowed is fetching(fresh_model).address_is_public
    fetcher.connect = no_transport  # nothing may be dialled, whatever the guard decides
    for host in NON_PUBLIC:
        with pytest.raises(ValueError, match="item 0: image host .* resolves to a non-public address"):
            fresh_model.encode([{"image": f"http://{host}:9/x.png"}])


def test_public_addresses_pass_the_default_guard(tiny_model):
    guard = fetching(tiny_model).address_is_public
    assert guard("93.184.215.14") and guard("2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert not guard("::ffff:10.0.0.1") and not guard("2002:7f00:1::1")  # IPv4 inside IPv6 judged as IPv4


def test_prepare_item_never_fetches_unless_asked(fresh_model, server):
    """The server's path (prepare_item without fetch_urls) keeps refusing URLs: its own policy decides."""
    url, hits = server
    fresh_model.processor.url_fetcher = fetching(fresh_model).UrlFetcher(address_allowed=loopback_only, connect=loopback_transport)
    with pytest.raises(ValueError, match="item 0: image URLs are not fetched by the model"):
        fresh_model.processor.prepare_item({"image": url + "/x.png"}, index=0, allow_paths=False)
    assert hits == []


def test_sentence_transformers_takes_image_urls_like_encode_image(tiny_dir, server, png):
    """Jina V4's sentence-transformers module treats an image URL as an image; Nova's fetches it with the
    same guarded fetcher as `encode_image` (loopback allowed here through the test hook only)."""
    from sentence_transformers import SentenceTransformer

    url, _ = server
    st_model = SentenceTransformer(str(tiny_dir), trust_remote_code=True, device="cpu")
    model = st_model[0].model
    model.processor.url_fetcher = fetching(model).UrlFetcher(address_allowed=loopback_only,
                                                             connect=loopback_transport)
    got = st_model.encode([url + "/x.png"], convert_to_tensor=True)
    want = model.encode_image([png], task="retrieval")
    assert float(got[0] @ want[0]) > 0.9999
    model.processor.url_fetcher = fetching(model).UrlFetcher(connect=no_transport)  # the default guard
    with pytest.raises(ValueError, match="10.0.0.1"):
        st_model.encode(["http://10.0.0.1/cat.png"])
