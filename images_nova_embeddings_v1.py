"""Image bytes and their decoding, one rule for every door: `encode()` in process, the server, the playground.

- base64: the standard or the URL-safe alphabet, whitespace ignored, padding optional; any other character
  is refused (never a silently different image);
- `data:` URLs must say `;base64`;
- decoding accepts a few raster formats only, and refuses a decompression bomb from the image header, before
  any pixel is decoded.

Standard library and PIL only, no relative imports: the server imports this file as a module of its own.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageRefused(ValueError):
    """An image that cannot be used; `code` is machine-readable: "invalid_image", or "image_too_large" (a
    server answers 413 for it)."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def base64_bytes(payload: str) -> bytes:
    """The bytes of a base64 image (the one base64 rule)."""
    compact = "".join(payload.split())
    padded = compact + "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.b64decode(padded, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ImageRefused("image is not valid base64") from None
    if not data:
        raise ImageRefused("image is empty")
    return data


def data_url_bytes(url: str) -> bytes:
    """The bytes of a `data:` URL image."""
    header, sep, payload = url.strip().partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ImageRefused("a data: URL image must be base64-encoded (data:image/...;base64,...)")
    return base64_bytes(payload)


def open_image(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """Image bytes -> an RGB PIL image; unknown formats and images over `max_pixels` (or `max_bytes`) are refused
    before any pixel is decoded."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRefused(f"image is {len(data)} bytes, over the limit of {max_bytes}", code="image_too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageRefused("image dimensions are too large (decompression bomb refused)",
                               code="image_too_large") from None
        except Exception:  # noqa: BLE001 - PIL raises many types for garbage input
            raise ImageRefused(f"not a supported image (formats: {', '.join(ALLOWED_FORMATS)})") from None
        return checked_rgb(image, max_pixels=max_pixels)


def checked_rgb(image: Image.Image, *, max_pixels: int) -> Image.Image:
    """An opened image (from bytes, or a PIL image a caller passed) within `max_pixels`, as RGB."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageRefused("image has no pixels")
    if width * height > max_pixels:
        raise ImageRefused(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                           "(decompression bombs are refused before decoding)", code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRefused("image refused as a decompression bomb", code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageRefused(f"image could not be decoded ({exc.__class__.__name__}: {exc})") from None
