"""One image rule for both doors: an image that `encode()` accepts, the server accepts with the same vector; one
that `encode()` refuses, the server refuses with a 4xx naming the item (inputs_nova_embeddings_v1)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import assert_close, make_png


def _tiff() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(out, format="TIFF")
    return out.getvalue()


PNG = make_png(seed=11)
ACCEPTED = {
    "standard base64": base64.b64encode(PNG).decode(),
    "URL-safe base64 without padding": base64.urlsafe_b64encode(PNG).decode().rstrip("="),
    "base64 with line breaks": base64.encodebytes(PNG).decode(),
    "data: URL": "data:image/png;base64," + base64.b64encode(PNG).decode(),
    "TIFF": base64.b64encode(_tiff()).decode(),
}
REFUSED = {
    "not base64": "this is not an image!",
    "data: URL without base64": "data:image/png," + base64.b64encode(PNG).decode(),
    "base64 of a text file": base64.b64encode(b"hello, world " * 10).decode(),
}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


def _post(server, image: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json={"input": [{"image": image}]}, timeout=60)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_an_image_encode_accepts_the_server_accepts_with_the_same_vector(server, tiny_model, name):
    image = ACCEPTED[name]
    want = tiny_model.encode([{"image": image}])[0].numpy()  # the string itself, as a Python user passes it
    response = _post(server, image)
    assert response.status_code == 200, response.text
    assert_close(np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32), want)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_image_encode_refuses_the_server_refuses(server, tiny_model, name):
    image = REFUSED[name]
    with pytest.raises(ValueError, match="item 0"):
        tiny_model.encode([{"image": image}])
    response = _post(server, image)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input[0].image"
