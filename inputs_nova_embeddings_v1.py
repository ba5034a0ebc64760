"""What an input item is, one rule for every door (`encode()` in process, the server, the playground, `nova embed`):
its fields (`ITEM_FIELDS`, with the JSON schema the server publishes), their shape (`check_item`), and its image
bytes and their decoding:

- base64: the standard alphabet with its padding, or the URL-safe alphabet with or without it; whitespace is
  ignored; anything else is refused (never a silently different image);
- `data:` URLs must say `;base64`;
- decoding accepts a few raster formats only, and refuses a decompression bomb from the image header, before
  any pixel is decoded.

Standard library and PIL only, no relative imports: the server imports this file as a module of its own.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import warnings

from PIL import Image

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# An item's fields, with their JSON schemas (the server's /openapi.json publishes these): anything else is refused.
ITEM_FIELDS: dict[str, dict] = {
    "text": {"type": "string"},
    "image": {"type": "string", "description": "base64 (standard or URL-safe), a data: URL, or an http(s) URL "
                                               "(in process; on a server only with --allow-image-urls)"},
    "image_embeds": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    "image_grid_thw": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
    "task": {"type": "string", "description": "retrieval, retrieval.query, retrieval.passage, text-matching, code, "
                                              "code.query, code.passage"},
    "adapter": {"type": ["string", "null"], "description": "adapter name, or 'none' for the base model"},
    "instructions": {"type": ["string", "null"], "description": "overrides the request-level instructions"},
}
CONTENT_FIELDS = ("text", "image", "image_embeds")  # an item needs one of them


class InputRefused(ValueError):
    """An item (or its image) that cannot be used. `code` is machine-readable ("invalid_input",
    "invalid_image", or "image_too_large", which a server answers with 413), `field` the field at fault."""

    def __init__(self, message: str, code: str = "invalid_input", field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


class ImageRefused(InputRefused):
    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message, code, "image")


def unknown_fields_message(keys, known) -> str | None:
    """"unknown field 'x' (did you mean 'y'?); accepted fields: ..." for the keys outside `known`, or None."""
    unknown = [key for key in keys if key not in known]
    if not unknown:
        return None
    named = []
    for key in unknown:
        near = difflib.get_close_matches(str(key).lower(), sorted(known), n=1, cutoff=0.6)
        named.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    return (f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(named)}; accepted fields: "
            f"{', '.join(sorted(known))}")


def check_item(item: dict) -> None:
    """The shape every item must have, wherever it comes from: known fields only, text and instructions strings,
    non-empty text, some content, and not both an image and precomputed image embeddings."""
    message = unknown_fields_message(item, ITEM_FIELDS)
    if message:
        raise InputRefused(message)
    for key in ("text", "instructions", "task"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            raise InputRefused(f"'{key}' must be a string, not {type(value).__name__}", field=key)
    if item.get("text") == "":
        raise InputRefused("'text' is empty", field="text")
    if item.get("image") is not None and item.get("image_embeds") is not None:
        raise InputRefused("give either 'image' or 'image_embeds', not both")
    if not any(item.get(key) is not None for key in CONTENT_FIELDS):
        raise InputRefused("an item needs 'text', 'image' or 'image_embeds'")


def base64_bytes(payload: str) -> bytes:
    """The bytes of a base64 image (the one base64 rule)."""
    compact = "".join(payload.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        if "+" in compact or "/" in compact:  # not URL-safe either (and never a local path read as base64)
            raise ImageRefused("image is not valid base64") from None
        try:
            data = base64.b64decode(compact + "=" * (-len(compact) % 4), altchars=b"-_", validate=True)
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
