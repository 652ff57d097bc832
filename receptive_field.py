"""Leak and receptive-field report of a network, measured by gradients.

    python receptive_field.py model=diag_bilstm data=cifar10
    python receptive_field.py model=row_lstm data=binarized_mnist pixel=[20,14] output=row_lstm_rf.png
    python receptive_field.py model=pixelcnn model.net.num_layers=3 size=12

Composed like train.py (conf/receptive_field.yaml reads conf/model and conf/data), so it reports on any
architecture a config builds, a user's own included; nothing is trained and no data is read (only the
data config's channels, levels and size). For every output sub-pixel (c, i, j) of the LightningModule's
``forward`` it takes the gradient of the (B, K, C, H, W) logits with respect to the input image and prints:

- leaks: outputs that depend on a sub-pixel that is not before them in the order R, G, B of each pixel,
  pixels in raster order (their count and the first few, as (c, i, j) <- (c', i', j'));
- blind spots: per output position, how many earlier pixels it does not see at all (no colour of them
  reaches it), with the worst positions;
- whether each colour of a pixel reads the pixel's earlier colours;

and writes a PNG: the receptive field of ``pixel`` (default: the centre) over the image (green: seen, the
brighter the larger the gradient; red: earlier but unseen, a blind spot; magenta: later but seen, a leak;
grey: later, unseen; white: the pixel itself) beside a map of each position's blind-spot count.

Exit status: 0 when there is no leak, 1 when there is one. Gradients are exact zeros where a mask or the
recurrence cuts a path (in float32 as in float64: a product with a zero weight is an exact zero), and a
random init with random images makes accidental zeros unlikely (``images`` > 1 makes them rarer still).
Cost: one backward pass per ``batch`` output sub-pixels, so C * H * W / batch passes: at 32x32x3 about 50
passes, a few minutes on a CPU for the paper's MNIST-width recurrent networks; ``size=`` checks a smaller
image quickly, and a GPU is used when there is one.
"""

import logging
import math
import sys

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from pixel_models.cli import check_overrides, user_errors
from pixel_models.training.builders import build

log = logging.getLogger("receptive_field")


def input_gradients(
    model, channels: int, height: int, width: int, batch: int, seed: int, images: int, dtype, device
) -> torch.Tensor:
    """|d logits(c, i, j) / d x(c', i', j')| summed over ``images`` random images and a random mix of the K
    levels: (C, H, W, C, H, W), output first. Batch element b carries output b's gradient, so one backward
    pass gives ``batch`` outputs (images of a batch do not interact)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = [(c, i, j) for i in range(height) for j in range(width) for c in range(channels)]
    grads = torch.zeros(channels, height, width, channels, height, width, dtype=torch.float64)
    for _ in range(images):
        x = torch.rand(len(outputs), channels, height, width, dtype=dtype, generator=generator)
        for start in range(0, len(outputs), batch):
            chunk = outputs[start : start + batch]
            xs = x[start : start + len(chunk)].to(device).requires_grad_(True)
            logits = model(xs)  # (b, K, C, H, W)
            mix = (torch.rand(logits.shape[1], dtype=dtype, generator=generator) + 0.5).to(device)
            c, i, j = (torch.tensor(v) for v in zip(*chunk, strict=True))
            picked = logits[torch.arange(len(chunk)), :, c, i, j]  # (b, K)
            (g,) = torch.autograd.grad((picked * mix).sum(), xs)
            g = g.abs().double().cpu()
            for n, (cc, ii, jj) in enumerate(chunk):
                grads[cc, ii, jj] += g[n]
    return grads


def raster_order(channels: int, height: int, width: int, order=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (C, H, W, C, H, W): input before output; (H, W, H, W): input pixel earlier than output's.
    ``order``: each pixel's rank (H, W) in the model's generation order (None: raster order)."""
    pixel = torch.arange(height * width).view(height, width) if order is None else order
    earlier_pixel = pixel[:, :, None, None] > pixel[None, None, :, :]  # (H, W, H', W')
    same_pixel = pixel[:, :, None, None] == pixel[None, None, :, :]
    colour = torch.arange(channels)
    earlier_colour = colour[:, None] > colour[None, :]  # (C, C')
    before = earlier_pixel[None, :, :, None] | (
        same_pixel[None, :, :, None] & earlier_colour[:, None, None, :, None, None]
    )
    return before, earlier_pixel


def analyse(grads: torch.Tensor, order: torch.Tensor | None = None) -> dict:
    channels, height, width = grads.shape[:3]
    seen = grads > 0
    before, earlier_pixel = raster_order(channels, height, width, order)
    leaks = (seen & ~before).nonzero().tolist()
    # A pixel is seen by output position (i, j) if some colour of it reaches some colour's output there.
    pixel_seen = seen.any(dim=3).any(dim=0)  # (H, W, H', W')
    missed = earlier_pixel & ~pixel_seen
    missed_count = missed.flatten(2).sum(-1)  # (H, W)
    same_pixel_colours = [
        (c, earlier, bool(seen[c, :, :, earlier].diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1).all()))
        for c in range(channels)
        for earlier in range(c)
    ]
    return {"leaks": leaks, "missed": missed, "missed_count": missed_count, "colours": same_pixel_colours}


def picture(grads: torch.Tensor, result: dict, pixel: tuple[int, int], scale: int) -> Image.Image:
    channels, height, width = grads.shape[:3]
    pi, pj = pixel
    field = grads[:, pi, pj].sum(0).sum(0)  # (H', W'): every colour of the pixel, every input colour
    before, earlier = raster_order(1, height, width, result.get("order"))
    earlier = earlier[pi, pj]
    strength = torch.log1p(field / field[field > 0].min()) if (field > 0).any() else field
    strength = strength / strength.max() if strength.max() > 0 else strength
    rgb = torch.zeros(height, width, 3)
    for i in range(height):
        for j in range(width):
            if (i, j) == (pi, pj):
                rgb[i, j] = torch.tensor([1.0, 1.0, 1.0])
            elif earlier[i, j] and field[i, j] > 0:
                rgb[i, j] = torch.tensor([0.0, 0.35 + 0.65 * float(strength[i, j]), 0.0])
            elif earlier[i, j]:
                rgb[i, j] = torch.tensor([0.85, 0.1, 0.1])
            elif field[i, j] > 0:
                rgb[i, j] = torch.tensor([0.9, 0.0, 0.9])
            else:
                rgb[i, j] = torch.tensor([0.25, 0.25, 0.25])
    count = result["missed_count"].double()
    heat = count / count.max() if count.max() > 0 else count
    blind = torch.stack([heat, 0.15 * (1 - heat), 0.15 * (1 - heat)], dim=-1).float()
    panels = [(rgb * 255).byte().numpy(), (blind * 255).byte().numpy()]
    images = [Image.fromarray(p).resize((width * scale, height * scale), Image.NEAREST) for p in panels]
    gap, caption = scale, 14
    canvas = Image.new("RGB", (2 * width * scale + gap, height * scale + caption), "white")
    canvas.paste(images[0], (0, caption))
    canvas.paste(images[1], (width * scale + gap, caption))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), f"receptive field of pixel {pi},{pj}", fill="black")
    draw.text((width * scale + gap + 2, 1), f"blind spots (max {int(count.max())})", fill="black")
    return canvas


def report(cfg: DictConfig) -> int:
    channels, levels = int(cfg.data.num_channels), int(cfg.data.num_levels)
    size = int(cfg.size) if cfg.size is not None else int(cfg.data.image_size)
    if size < 1 or size > 64:
        raise ValueError(
            f"size={size}: choose 1..64 (the report takes one backward pass per {cfg.batch} outputs)"
        )
    if cfg.batch < 1:
        raise ValueError(f"batch={cfg.batch} must be at least 1")
    pixel = tuple(cfg.pixel) if cfg.pixel is not None else (size // 2, size // 2)
    if len(pixel) != 2 or not all(0 <= int(p) < size for p in pixel):
        raise ValueError(f"pixel={list(pixel)} must be [row, column] inside the {size}x{size} image")
    pixel = (int(pixel[0]), int(pixel[1]))
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    if cfg.dtype not in dtypes:
        raise ValueError(f"dtype={cfg.dtype!r}: choose float32 or float64")
    if cfg.images < 1:
        raise ValueError(f"images={cfg.images} must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = build(cfg.model).to(device=device, dtype=dtypes[cfg.dtype]).eval()
    arch = cfg.model.net.get("arch", "?")
    log.info(f"{arch}: {channels} colour(s), K={levels}, {size}x{size}; {channels * size * size} outputs")
    grads = input_gradients(
        model, channels, size, size, int(cfg.batch), int(cfg.seed), int(cfg.images), dtypes[cfg.dtype], device
    )
    # A model with its own generation order (the Multi-Scale PixelRNN) is judged in that order.
    generation_order = getattr(model.net, "generation_order", None)
    order = generation_order(size, size) if generation_order is not None else None
    if order is not None:
        print("judged in the model's own generation order (not raster order)")
    result = analyse(grads, order)
    result["order"] = order

    leaks = result["leaks"]
    if leaks:
        shown = ", ".join(f"({c},{i},{j}) <- ({c2},{i2},{j2})" for c, i, j, c2, i2, j2 in leaks[:5])
        print(f"LEAK: {len(leaks)} output/input pairs depend on a later sub-pixel, e.g. {shown}")
    else:
        print("no leak: no output depends on its own or a later sub-pixel")
    count = result["missed_count"]
    blind = int((count > 0).sum())
    if blind:
        worst = count.flatten().topk(min(3, count.numel()))
        positions = [divmod(int(k), size) for k in worst.indices]
        shown = ", ".join(f"{p} misses {int(n)}" for p, n in zip(positions, worst.values, strict=True))
        print(
            f"blind spots: {blind} of {size * size} positions miss earlier pixels "
            f"(most: {int(count.max())} of up to {size * size - 1}; {shown})"
        )
    else:
        print("no blind spot: every position sees every earlier pixel")
    for c, earlier, ok in result["colours"]:
        print(f"colour {c} {'reads' if ok else 'does NOT read'} colour {earlier} of its own pixel everywhere")
    missed_here = int(count[pixel])
    earlier_here = int(raster_order(1, size, size, order)[1][pixel].sum())
    print(f"pixel {pixel}: sees {earlier_here - missed_here} of its {earlier_here} earlier pixels")
    image = picture(grads, result, pixel, max(4, math.ceil(256 / size)))
    image.save(cfg.output)
    print(f"receptive field of pixel {pixel} written to {cfg.output}")
    return 1 if leaks else 0


@hydra.main(version_base="1.3", config_path="conf", config_name="receptive_field")
def main(cfg: DictConfig) -> None:
    with user_errors():  # a bad setting: one line, exit code 2
        code = report(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    check_overrides(__file__, "receptive_field")
    main()
