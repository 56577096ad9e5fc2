"""Labels burned into comparison videos: each panel's name in its corner, the prompt in a band
below, so a side-by-side says what it shows wherever it is played or shared.

Drawn with Pillow's built-in font (no font file to find); the sizes scale with the frame, so the
text stays readable from the proxies' 96x144 up to 480x720.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BAND_BLOCK = 16  # the band's height is a multiple of 16, as mp4 encoders want the frame's


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """`text`, cut with an ellipsis where it would be wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def labelled(panels: list[np.ndarray], names: list[str], caption: str) -> np.ndarray:
    """Panels [F, H, W, 3] (uint8, one size) side by side, each `name` in its top-left corner and
    `caption` in a black band under them: [F, H + band, W * len(panels), 3]."""
    frames, height, width = panels[0].shape[:3]
    size = max(10, height // 24)  # 10 px at 96 rows, 20 px at 480
    band = BAND_BLOCK * -(-(size + size // 2) // BAND_BLOCK)
    # The text is drawn once, on an RGBA layer, and composited onto every frame.
    layer = Image.new("RGBA", (width * len(panels), height + band), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font, pad = _font(size), max(1, size // 5)
    for i, name in enumerate(names):
        text = _fit(draw, name, font, width - 2 * pad)
        box = draw.textbbox((i * width + pad, pad), text, font=font)
        draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(0, 0, 0, 160))
        draw.text((i * width + pad, pad), text, font=font, fill=(255, 255, 255, 255))
    draw.rectangle((0, height, layer.width, layer.height), fill=(0, 0, 0, 255))
    draw.text((2 * pad, height + band // 2), _fit(draw, caption, font, layer.width - 4 * pad), font=font, fill=(255, 255, 255, 255), anchor="lm")
    alpha = np.asarray(layer)[..., 3:].astype(np.float32) / 255.0
    ink = np.asarray(layer)[..., :3].astype(np.float32)
    canvas = np.zeros((frames, height + band, width * len(panels), 3), np.float32)
    canvas[:, :height] = np.concatenate(panels, axis=2)
    return (canvas * (1 - alpha) + ink * alpha).round().astype(np.uint8)
