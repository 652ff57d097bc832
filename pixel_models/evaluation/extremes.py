"""The images of a split the model finds least and most likely, each with its NLL written under it."""

import torch
from PIL import Image, ImageDraw

from pixel_models.evaluation.drawing import BACKGROUND, INK, font, levels_to_image, text_size

Shown = tuple[torch.Tensor, float, int]  # an image's levels (C, H, W), its NLL, its index in the split


def extremes_grid(
    highest: list[Shown], lowest: list[Shown], num_levels: int, unit: str = "nats", tile: int = 84
) -> Image.Image:
    """Two rows of images: the ``highest``-NLL ones, then the ``lowest``; under each its NLL in ``unit``
    and its index in the split."""
    shown = [*highest, *lowest]
    size = shown[0][0].shape[-1] if shown else 1
    scale = max(1, tile // size)
    face, small = font(13), font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 8
    widest = max((text_size(probe, f"{nll:.2f} {unit}", small)[0] for _, nll, _ in shown), default=0)
    cell_w = max(size * scale, widest) + pad
    line_h = text_size(probe, "0123456789", small)[1] + 3
    header_h = text_size(probe, "Ag", face)[1] + 6
    cell_h = size * scale + 2 * line_h + pad
    columns = max(len(highest), len(lowest), 1)
    rows = [("highest NLL (least likely)", highest), ("lowest NLL (most likely)", lowest)]
    canvas = Image.new("RGB", (pad + columns * cell_w, pad + len(rows) * (header_h + cell_h)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for heading, images in rows:
        draw.text((pad, y), heading, fill=INK, font=face)
        y += header_h
        for column, (levels, nll, index) in enumerate(images):
            x = pad + column * cell_w
            canvas.paste(levels_to_image(levels, num_levels, scale), (x, y))
            draw.text((x, y + size * scale + 2), f"{nll:.2f} {unit}", fill=INK, font=small)
            draw.text((x, y + size * scale + 2 + line_h), f"#{index}", fill=INK, font=small)
        y += cell_h
    return canvas
