"""Shared fixtures: the tiny random-weight checkpoint (real tokenizer, image processor, template) and
models loaded from it. Nothing here reaches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from nova.loading import load_model  # noqa: E402
from nova.tiny import ensure_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir():
    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """Shared, read-only: tests that load or unload adapters use `fresh_model`."""
    return load_model(tiny_dir)


@pytest.fixture
def fresh_model(tiny_dir):
    return load_model(tiny_dir)


def _make_image(width: int = 120, height: int = 80, seed: int = 0) -> Image.Image:
    """A deterministic colour gradient (not flat, so patches differ)."""
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x + y) % 256)
                   for y in range(height) for x in range(width)])
    return image


@pytest.fixture
def make_image():
    """Factory fixture (test modules cannot import from conftest: pytest keys every conftest by one name)."""
    return _make_image


@pytest.fixture
def image():
    return _make_image()
