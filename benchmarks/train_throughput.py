"""Training throughput: images per second of one full training step (forward, backward, Adam update).

One JSON line per model x shape, then one line of step-time ratios against PixelCNN from the same
run (machines are noisy; compare within a run). Models are built from the same Hydra configs users
train with: `conf/model/<name>.yaml` at the MNIST setup (7 layers, h=16, 32 output maps).

    python benchmarks/train_throughput.py [--models pixelcnn ... pixelcnn_pp] [--steps 10]

Shapes: binarized MNIST 28x28x1 K=2, and CIFAR-10 32x32x3 K=256 at the same reduced MNIST widths
(the paper's h=128 / 1024 output maps are GPU sizes; pass --cifar-hidden/--cifar-output to change).
PixelCNN++ runs at its own config (`conf/model/pixelcnn_pp.yaml`: 32 filters, 2 blocks per stage, 3
stages, logistic mixture of 10); --pp-filters / --pp-resnet change it.

Memory: ``saved_mb_per_image`` is what autograd keeps for the backward pass per image (every tensor
saved by a forward op, counted once per storage): the activation memory that grows with the batch, and
the same on any device. On a GPU, ``cuda_peak_mb_per_image`` is the allocator's peak over a step.
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


def saved_bytes_per_image(module, data_cfg, batch: int) -> float:
    """Bytes autograd saves for backward in one forward pass, per image (each storage once)."""
    c, k, s = data_cfg.num_channels, data_cfg.num_levels, data_cfg.image_size
    levels = torch.randint(0, k, (batch, c, s, s))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.nll(levels).mean()
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / batch


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
        "--models",
        nargs="+",
        default=["pixelcnn", "row_lstm", "diag_bilstm", "gated_pixelcnn", "pixelcnn_pp"],
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--cifar-hidden", type=int, default=None, help="h at CIFAR-10 shapes (default: config's)"
    )
    parser.add_argument("--cifar-output", type=int, default=None, help="output maps at CIFAR-10 shapes")
    parser.add_argument("--pp-filters", type=int, default=None, help="PixelCNN++ filters (default: config's)")
    parser.add_argument("--pp-resnet", type=int, default=None, help="PixelCNN++ blocks per stage")
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
            if model == "pixelcnn_pp":  # its net has no hidden / output_hidden
                model_overrides = [o for o in overrides if not o.startswith("model.net.")]
                if args.pp_filters:
                    model_overrides.append(f"model.net.num_filters={args.pp_filters}")
                if args.pp_resnet:
                    model_overrides.append(f"model.net.num_resnet={args.pp_resnet}")
            else:
                model_overrides = overrides
            module, data_cfg = build(model, data, model_overrides)
            saved = saved_bytes_per_image(module.train(), data_cfg, args.batch)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            seconds = step_time(module.train(), data_cfg, args.batch, args.steps)
            memory = {"saved_mb_per_image": round(saved / 2**20, 2)}
            if torch.cuda.is_available():
                memory["cuda_peak_mb_per_image"] = round(
                    torch.cuda.max_memory_allocated() / 2**20 / args.batch, 2
                )
            times[model] = seconds
            print(
                json.dumps(
                    {
                        "case": f"{model}/{shape}",
                        "batch": args.batch,
                        "hidden": module.hparams.net.get("hidden"),
                        "layers": module.hparams.net.get("num_layers"),
                        "net": {k: v for k, v in module.hparams.net.items() if k != "arch"},
                        "output": module.hparams.output["name"],
                        "step_ms": round(seconds * 1e3, 2),
                        "images_per_s": round(args.batch / seconds, 1),
                        "threads": torch.get_num_threads(),
                        **memory,
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
