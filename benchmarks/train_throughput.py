"""Training throughput: images per second of one full training step (forward, backward, Adam update).

One JSON line per model x shape, then one line of step-time ratios against PixelCNN from the same
run (machines are noisy; compare within a run). Models are built from the same Hydra configs users
train with: `conf/model/<name>.yaml` at the MNIST setup (7 layers, h=16, 32 output maps).

    python benchmarks/train_throughput.py [--models pixelcnn row_lstm diag_bilstm gated_pixelcnn] [--steps 10]

Shapes: binarized MNIST 28x28x1 K=2, and CIFAR-10 32x32x3 K=256 at the same reduced MNIST widths
(the paper's h=128 / 1024 output maps are GPU sizes; pass --cifar-hidden/--cifar-output to change).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SHAPES = {"mnist_28x28x1_k2": ("binarized_mnist", []), "cifar10_32x32x3_k256": ("cifar10", [])}


def build(model: str, data: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", f"data={data}", *overrides])
    return instantiate(cfg.model), cfg.data


def step_time(module, data_cfg, batch: int, steps: int) -> float:
    c, k, s = data_cfg.num_channels, data_cfg.num_levels, data_cfg.image_size
    levels = torch.randint(0, k, (batch, c, s, s))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        module.nll(levels).mean().backward()
        optimizer.step()

    for _ in range(2):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["pixelcnn", "row_lstm", "diag_bilstm", "gated_pixelcnn"]
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--cifar-hidden", type=int, default=None, help="h at CIFAR-10 shapes (default: config's)"
    )
    parser.add_argument("--cifar-output", type=int, default=None, help="output maps at CIFAR-10 shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    for shape, (data, overrides) in SHAPES.items():
        overrides = list(overrides)
        if data == "cifar10":
            # Hidden widths must hold the 3 colour groups evenly for the output layers' group masks.
            if args.cifar_hidden:
                overrides.append(f"model.net.hidden={args.cifar_hidden}")
            if args.cifar_output:
                overrides.append(f"model.net.output_hidden={args.cifar_output}")
        times = {}
        for model in args.models:
            module, data_cfg = build(model, data, overrides)
            seconds = step_time(module.train(), data_cfg, args.batch, args.steps)
            times[model] = seconds
            print(
                json.dumps(
                    {
                        "case": f"{model}/{shape}",
                        "batch": args.batch,
                        "hidden": module.hparams.net["hidden"],
                        "layers": module.hparams.net["num_layers"],
                        "step_ms": round(seconds * 1e3, 2),
                        "images_per_s": round(args.batch / seconds, 1),
                        "threads": torch.get_num_threads(),
                    }
                ),
                flush=True,
            )
        base = times.get("pixelcnn")
        if base:
            print(
                json.dumps(
                    {
                        "case": f"step_time_ratio_vs_pixelcnn/{shape}",
                        **{m: round(t / base, 2) for m, t in times.items()},
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
