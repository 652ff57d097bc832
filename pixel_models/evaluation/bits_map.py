"""Where does the model spend its bits? A heat map of the mean NLL of each sub-pixel position."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from pixel_models.evaluation.drawing import BACKGROUND, INK, colorize, font, nice_ticks, text_size

COLOUR_NAMES = {1: [""], 3: ["R", "G", "B"]}


def bits_map_image(bits: torch.Tensor, title: str = "", target_width: int = 224) -> Image.Image:
    """A PNG-ready picture of ``bits`` (C, H, W), mean bits per sub-pixel position: one map per colour
    (R, G, B side by side for C=3) on one shared scale from 0 bits, with a labelled colour bar."""
    channels, height, width = bits.shape
    values = bits.double().numpy()
    vmax = float(values.max()) if values.size else 0.0
    scale = max(1, target_width // width)
    names = COLOUR_NAMES.get(channels, [f"c{c}" for c in range(channels)])
    face, small = font(13), font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    ticks = nice_ticks(vmax)
    tick_labels = [f"{t:g}" for t in ticks]
    label_width = max(text_size(probe, label, small)[0] for label in [*tick_labels, "bits"])

    pad, bar_width = 10, 16
    map_w, map_h = width * scale, height * scale
    title_h = text_size(probe, title or "Ag", face)[1] + pad if title else 0
    name_h = text_size(probe, "R", face)[1] + 4 if channels > 1 else 0
    unit_h = text_size(probe, "bits", small)[1] + 4
    content_w = pad + channels * (map_w + pad) + bar_width + 6 + label_width + pad
    total_w = max(content_w, 2 * pad + (text_size(probe, title, face)[0] if title else 0))
    total_h = pad + title_h + name_h + map_h + unit_h + pad
    canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=INK, font=face)

    top = pad + title_h + name_h
    for c in range(channels):
        left = pad + c * (map_w + pad)
        heat = Image.fromarray(colorize(values[c], vmax), "RGB").resize(
            (map_w, map_h), Image.Resampling.NEAREST
        )
        canvas.paste(heat, (left, top))
        if names[c]:
            draw.text(
                (left + map_w // 2 - text_size(draw, names[c], face)[0] // 2, top - name_h),
                names[c],
                fill=INK,
                font=face,
            )

    # the colour bar: bright (many bits) at the top
    bar_left = pad + channels * (map_w + pad)
    ramp = np.linspace(vmax, 0.0, map_h)[:, None].repeat(bar_width, 1)
    canvas.paste(Image.fromarray(colorize(ramp, vmax), "RGB"), (bar_left, top))
    draw.rectangle((bar_left, top, bar_left + bar_width - 1, top + map_h - 1), outline=INK)
    for tick, label in zip(ticks, tick_labels, strict=True):
        y = top + round((1 - tick / vmax) * (map_h - 1)) if vmax > 0 else top + map_h - 1
        draw.line((bar_left + bar_width, y, bar_left + bar_width + 3, y), fill=INK)
        h = text_size(draw, label, small)[1]
        draw.text(
            (bar_left + bar_width + 6, min(max(y - h // 2, top), top + map_h - h)),
            label,
            fill=INK,
            font=small,
        )
    draw.text((bar_left, top + map_h + 2), "bits", fill=INK, font=small)
    return canvas
