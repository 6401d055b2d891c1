"""The simulator's images, drawn with Pillow: output PNGs made from the input image, prompt, seed and aspect ratio.

An output is its source cropped to the requested ratio, scaled to the configured longest side, tinted by
(prompt, seed) and labelled with both, so outputs of different jobs look different. A source the simulator
cannot fetch or decode is a synthetic gradient seeded by whatever names it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import urllib.parse
from collections.abc import Mapping
from functools import cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "aspect_size",
    "center_crop",
    "decode_data_uri",
    "decode_image",
    "parse_ratio",
    "render_output",
    "synthetic_image",
    "tint_colour",
]


def parse_ratio(aspect: Any) -> float | None:
    """Width over height of an ``aspect_ratio`` like "16:9"; None for match_input_image or anything else."""
    if not isinstance(aspect, str) or aspect.count(":") != 1:
        return None
    width, height = aspect.split(":")
    try:
        w, h = float(width), float(height)
    except ValueError:
        return None
    return w / h if w > 0 and h > 0 else None


def aspect_size(ratio: float, longest: int) -> tuple[int, int]:
    """The (width, height) of the given ratio whose longest side is ``longest``."""
    if ratio >= 1:
        return longest, max(1, round(longest / ratio))
    return max(1, round(longest * ratio)), longest


def center_crop(image: Image.Image, ratio: float) -> Image.Image:
    """The largest centred part of ``image`` with the given width/height ratio."""
    width, height = image.size
    if width / height > ratio:
        new_width = max(1, min(width, round(height * ratio)))
        left = (width - new_width) // 2
        return image.crop((left, 0, left + new_width, height))
    new_height = max(1, min(height, round(width / ratio)))
    top = (height - new_height) // 2
    return image.crop((0, top, width, top + new_height))


def synthetic_image(key: str, longest: int) -> tuple[Image.Image, float]:
    """A gradient with a disc, seeded by ``key``: the stand-in for inputs the simulator cannot fetch."""
    digest = hashlib.sha256(key.encode()).digest()
    ratio = (4 / 3, 3 / 4, 1.0, 16 / 9, 2 / 3)[digest[0] % 5]
    size = aspect_size(ratio, longest)
    mask = Image.linear_gradient("L").rotate(digest[7] * 360 / 256).resize(size)
    image = Image.composite(
        Image.new("RGB", size, (digest[1], digest[2], digest[3])),
        Image.new("RGB", size, (digest[4], digest[5], digest[6])),
        mask,
    )
    width, height = size
    cx, cy, r = width * digest[8] / 255, height * digest[9] / 255, min(size) * (0.15 + digest[10] / 1024)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(digest[11], digest[12], digest[13]))
    return image, ratio


def tint_colour(prompt: str, seed: Any) -> tuple[int, int, int]:
    """A colour derived from (prompt, seed), so outputs of different jobs look different."""
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


@cache
def _font() -> ImageFont.ImageFont:
    # Pillow's bitmap font: it draws a label in 0.09 ms where its default FreeType font takes 1.1 ms, which at 100x
    # the limits (about 300 outputs a second) was a third of the simulator's CPU and throttled its downloads.
    return ImageFont.load_default_imagefont()


def render_output(source: Image.Image, source_ratio: float, inputs: Mapping[str, Any], longest: int) -> bytes:
    """The output PNG: ``source`` cropped to the requested ratio, scaled, tinted, labelled (seed, prompt)."""
    ratio = parse_ratio(inputs.get("aspect_ratio")) or source_ratio
    prompt = str(inputs.get("prompt", ""))
    seed = inputs.get("seed")
    image = center_crop(source, ratio).resize(aspect_size(ratio, longest), Image.Resampling.BILINEAR)
    image = Image.blend(image, Image.new("RGB", image.size, tint_colour(prompt, seed)), 0.35)
    words = prompt.split()
    label = f"seed {'-' if seed is None else seed}\n{' '.join(words[:4])}{' ...' if len(words) > 4 else ''}"
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.multiline_textbbox((4, 4), label, font=_font())
    draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(0, 0, 0))
    draw.multiline_text((4, 4), label, fill=(255, 255, 255), font=_font())
    buffer = io.BytesIO()
    # Fast compression: the benchmark downloads every output, and size hardly matters on loopback.
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded)."""
    header, _, payload = uri.partition(",")
    if header.endswith(";base64"):
        return base64.b64decode(payload)
    return urllib.parse.unquote_to_bytes(payload)


def decode_image(data: bytes, longest: int) -> tuple[Image.Image, float]:
    """``data`` decoded to RGB at most ``2 * longest`` a side, and the width/height ratio of the original."""
    opened = Image.open(io.BytesIO(data))
    ratio = opened.width / opened.height
    # draft() lets JPEG decode at a reduced scale: large inputs cost little.
    opened.draft("RGB", (2 * longest, 2 * longest))
    image = opened.convert("RGB")
    image.thumbnail((2 * longest, 2 * longest))
    return image, ratio
