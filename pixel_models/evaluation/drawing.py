"""Small drawing helpers shared by the evaluation pictures (Pillow only): a font, text, a colour map."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A dark-to-bright sequential colour map (close to matplotlib's "inferno"): dark = few bits, bright = many.
_ANCHORS = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, face) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
    return right - left, bottom - top


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """Values in [0, vmax] -> uint8 RGB (..., 3) through the colour map."""
    t = np.clip(values / vmax if vmax > 0 else np.zeros_like(values), 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(t).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (t - low)[..., None]
    rgb = _ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)


def levels_to_image(levels: torch.Tensor, num_levels: int, scale: int) -> Image.Image:
    """One image of integer levels (C, H, W) as an RGB picture, each pixel ``scale`` x ``scale``."""
    values = (levels.double() / (num_levels - 1) * 255).round().clamp(0, 255).to(torch.uint8)
    array = values.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")
    size = (image.width * scale, image.height * scale)
    return image.convert("RGB").resize(size, Image.Resampling.NEAREST)


def nice_ticks(vmax: float, count: int = 5) -> list[float]:
    """Up to ``count`` + 1 round tick values from 0 to at most ``vmax``."""
    if vmax <= 0:
        return [0.0]
    raw = vmax / count
    magnitude = 10 ** np.floor(np.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [float(i * step) for i in range(int(vmax / step + 1e-9) + 1)]
