"""Training step of the Multi-Scale PixelRNN against its base network, at 32x32x3 (CIFAR-10 shapes, K=256).

    python benchmarks/multiscale_throughput.py [--base row_lstm] [--small-size 16] [--rounds 3] [--threads 1]

One JSON line per model: the best of ``rounds`` rounds of 2 steps (forward, backward, Adam), rounds
alternating between the two models so that a busy machine slows both alike; ``ratio`` is the step time
against the base network's, from the same run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# This checkout's code, whatever else is installed (python puts benchmarks/, not the root, on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(model: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "data=cifar10", *overrides])
    return instantiate(cfg.model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="row_lstm")
    parser.add_argument("--small-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {
        args.base: build(args.base, []),
        f"multiscale({args.base}, {args.small_size}x{args.small_size} first)": build(
            "multiscale", [f"model.net.base={args.base}", f"model.net.small_size={args.small_size}"]
        ),
    }
    levels = torch.randint(0, 256, (args.batch, 3, 32, 32))
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, module in models.items():
            optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
            start = time.perf_counter()
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                module.nll(levels).mean().backward()
                optimizer.step()
            times[name].append((time.perf_counter() - start) / 2)
    base = min(times[args.base])
    for name, seconds in times.items():
        best = min(seconds)
        print(
            json.dumps(
                {
                    "model": name,
                    "shape": "32x32x3_k256",
                    "batch": args.batch,
                    "threads": args.threads,
                    "step_s": round(best, 3),
                    "images_per_s": round(args.batch / best, 2),
                    "ratio": round(best / base, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
