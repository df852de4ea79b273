"""Checking uploaded images before they reach the queue.

Every check here runs on the request's own bytes, before the image is queued, so a bad upload is
answered with a 4xx and never costs a model call. The pixel limit is checked from the header, before
any pixel is decoded (decompression bombs), and only a fixed list of formats is opened at all (PIL can
open formats such as EPS that would start external programs).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings

import PIL.Image

from .errors import ServeError

# Formats a client may upload. PIL's other formats are refused with 415 rather than opened.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string (a ``data:image/...;base64,`` URL prefix is allowed).

    Raises ``ServeError`` ``payload_too_large`` before decoding when the text is too long to fit in
    ``max_bytes``, and ``invalid_base64`` for anything that is not strict base64.
    """
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ServeError("invalid_base64", "a data URL `image` must look like 'data:image/png;base64,<data>'")
    text = "".join(text.split())  # line breaks are common in base64 produced by tools
    if len(text) // 4 * 3 > max_bytes + 2:
        raise ServeError("payload_too_large", f"the image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ServeError("invalid_base64", f"`image` is not valid base64 ({e})") from None
    return data


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> PIL.Image.Image:
    """Decode and check one uploaded image; returns it as an RGB PIL image (first frame if animated).

    Raises ``ServeError``: ``payload_too_large`` (more than ``max_bytes``), ``not_an_image`` (no
    accepted format recognises the bytes), ``unsupported_media_type`` (an image, but not one of
    ``ACCEPTED_FORMATS``), ``too_many_pixels`` (width * height > ``max_pixels``, checked from the header),
    ``truncated_image`` (the header parses but the pixel data is cut short or corrupt).
    """
    if len(data) > max_bytes:
        raise ServeError("payload_too_large", f"the image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ServeError("not_an_image", "the image is empty (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns (DecompressionBombWarning, corrupt EXIF) on hostile input; the checks below decide.
        warnings.simplefilter("ignore")
        image = _open(data, max_pixels)
        try:
            image.verify()  # structure and checksums, without decoding pixels
            image = _open(data, max_pixels)  # verify() leaves the image unusable: reopen to decode
            image.load()
        except ServeError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise ServeError("truncated_image", f"the {image.format} image is truncated or corrupt ({e})") from None
        except PIL.Image.DecompressionBombError:
            raise ServeError("too_many_pixels", f"the image has more than {max_pixels} pixels") from None
    return image.convert("RGB")


def _open(data: bytes, max_pixels: int) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except PIL.Image.DecompressionBombError:
        raise ServeError("too_many_pixels", f"the image has more than {max_pixels} pixels") from None
    except PIL.UnidentifiedImageError:
        try:
            other = PIL.Image.open(io.BytesIO(data)).format
        except Exception:
            other = None
        if other:
            raise ServeError("unsupported_media_type", f"{other} images are not accepted; send one of "
                             f"{', '.join(ACCEPTED_FORMATS)}") from None
        raise ServeError("not_an_image", "the uploaded bytes are not an image in any accepted format "
                         f"({', '.join(ACCEPTED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ServeError("truncated_image", f"the image header is truncated or corrupt ({e})") from None
    w, h = image.size
    if w < 1 or h < 1:
        raise ServeError("truncated_image", f"the image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ServeError("too_many_pixels", f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    return image

