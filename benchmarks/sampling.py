"""Sampling speed: images per second of the cached and the naive sampler, and the speedup.

One JSON line per architecture x shape x batch size (1, 16, 64). Models are built from the configs
users train with, `conf/model/<name>.yaml`, at the MNIST setup (7 layers, h=16, 32 output maps), with
untrained weights (speed does not depend on them):

- binarized MNIST shapes, 28x28x1, K=2;
- CIFAR-10 shapes, 32x32x3, K=256, at the same reduced MNIST widths (the paper's h=128 / 1024 output
  maps are GPU sizes; pass --cifar-hidden / --cifar-output to change). The JSON gives the widths.

Both samplers are timed by running the real ``generate`` for the first rows of the image and stopping
it there. The cached sampler runs all rows by default (--cached-rows to cut that); the naive one, a
whole network pass per sub-pixel, only its first --naive-steps sub-pixels (default 28, one MNIST row):
its per-step time is extrapolated to the whole image, which is fair because every naive step costs
the same full pass (one untimed pass first sets up the convolution kernels).
A busy machine hurts the naive sampler most (its convolutions run in parallel regions, which wait
for a free core); --threads 1 gives steadier numbers on a shared CPU.

Fields: ``*_ms_per_step`` (one sub-pixel for the whole batch), ``*_images_per_s``,
``cached_rows_timed``, ``naive_steps_timed``, ``naive_extrapolated``. An architecture without a model
config gets one line saying it was skipped.

    python benchmarks/sampling.py [--models pixelcnn ... pixelcnn_pp] [--batches 1 16 64]

PixelCNN++ runs at its own config (`conf/model/pixelcnn_pp.yaml`: 32 filters, 2 blocks per stage, 3
stages, logistic mixture of 10); --pp-filters / --pp-resnet change it. The JSON gives its net as ``net``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

# This checkout's code, whatever else is installed (python puts benchmarks/, not the root, on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# From the root, not as a sibling: gpu_check.py imports this file as benchmarks.sampling.
from benchmarks.model_options import MODELS, add_width_options, width_overrides
from pixel_models.sampling.generate import generate, uniform_noise

CONF = Path(__file__).resolve().parents[1] / "conf"
SHAPES = {"mnist_28x28x1_k2": "binarized_mnist", "cifar10_32x32x3_k256": "cifar10"}


class StopSampling(Exception):
    pass


class StopAfterPasses(torch.nn.Module):
    """The network, stopping ``generate`` after ``passes`` forward passes (one per naive step)."""

    def __init__(self, net: torch.nn.Module, passes: int):
        super().__init__()
        self.net, self.passes = net, passes
        self.distribution = net.distribution

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.passes == 0:
            raise StopSampling
        self.passes -= 1
        return self.net(x, label)


def build(model: str, data: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", f"data={data}", *overrides])
    return instantiate(cfg.model).eval()


def time_cached(net, noise: torch.Tensor, num_levels: int, rows: int) -> tuple[float, int]:
    """Seconds per sub-pixel step of cached ``generate`` over its first ``rows`` rows, and the rows timed."""
    _, channels, height, width = noise.shape
    rows = min(rows, height)

    def stop_after(i: int) -> None:
        if i + 1 == rows:
            raise StopSampling

    start = time.perf_counter()
    try:
        generate(net, noise, num_levels, method="cached", on_row=stop_after)
    except StopSampling:
        pass
    return (time.perf_counter() - start) / (rows * width * channels), rows


def time_naive(net, noise: torch.Tensor, num_levels: int, steps: int) -> tuple[float, int]:
    """Seconds per sub-pixel step of naive ``generate`` over its first ``steps`` steps, and steps timed."""
    steps = min(steps, noise[0].numel())
    with torch.no_grad():
        net(torch.zeros_like(noise))  # warm-up: the first pass at a new shape sets up its kernels
    start = time.perf_counter()
    try:
        generate(StopAfterPasses(net, steps), noise, num_levels, method="naive")
    except StopSampling:
        pass
    return (time.perf_counter() - start) / steps, steps


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument(
        "--naive-steps", type=int, default=28, help="sub-pixels the naive sampler is timed over"
    )
    parser.add_argument("--cached-rows", type=int, default=None, help="rows timed for cached (default: all)")
    add_width_options(parser, hidden_default="MNIST's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for shape in args.shapes:
        data = SHAPES[shape]
        for model in args.models:
            case = f"{model}/{shape}"
            if not (CONF / "model" / f"{model}.yaml").is_file():
                print(json.dumps({"case": case, "skipped": f"no conf/model/{model}.yaml"}), flush=True)
                continue
            module = build(model, data, width_overrides(model, data, args))
            size, channels, num_levels = module.image_size, module.num_channels, module.num_levels
            for batch in args.batches:
                noise = uniform_noise(batch, channels, size, size, seed=0)
                time_cached(module.net, noise, num_levels, 1)  # warm-up
                cached_rows = args.cached_rows or size
                cached, cached_rows = time_cached(module.net, noise, num_levels, cached_rows)
                naive, naive_steps = time_naive(module.net, noise, num_levels, args.naive_steps)
                steps_per_image = size * size * channels
                print(
                    json.dumps(
                        {
                            "case": case,
                            "batch": batch,
                            "hidden": module.hparams.net.get("hidden"),
                            "layers": module.hparams.net.get("num_layers"),
                            "output_hidden": module.hparams.net.get("output_hidden"),
                            "net": {k: v for k, v in module.hparams.net.items() if k != "arch"},
                            "output": module.hparams.output["name"],
                            "threads": torch.get_num_threads(),
                            "cached_ms_per_step": round(cached * 1e3, 3),
                            "cached_images_per_s": round(batch / (cached * steps_per_image), 2),
                            "cached_rows_timed": cached_rows,
                            "naive_ms_per_step": round(naive * 1e3, 3),
                            "naive_images_per_s": round(batch / (naive * steps_per_image), 3),
                            "naive_steps_timed": naive_steps,
                            "naive_extrapolated": naive_steps < steps_per_image,
                            "speedup": round(naive / cached, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
