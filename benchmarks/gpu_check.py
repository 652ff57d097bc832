"""Everything worth knowing the first time a GPU is at hand, in one budgeted run (< 8 minutes on one H200).

    python benchmarks/gpu_check.py [--budget 450] [--out gpu_check.jsonl]

Prints one JSON line per case (and appends them to --out):

1. ``throughput``: training step (forward, backward, Adam) images/s and peak memory per image for every
   architecture at the paper's MNIST (28x28x1, K=2; 7 layers, h=16, 32 output maps) and CIFAR-10
   (32x32x3, K=256; 12 layers, h=128, 1024 output maps; PixelCNN 15 layers) sizes, float32 and bf16
   autocast (what ``trainer=gpu``'s ``precision: bf16-mixed`` runs), eager. Peak memory per image:
   (peak allocated at batch B) - (at batch B / 2), divided by B / 2, so weights and optimizer state cancel.
2. ``throughput_compiled``: the same with ``net.compile()`` (as ``compile=true`` does), one child
   process per architecture with a hard time limit, since compiling a Python loop over hundreds of
   steps can take minutes; a case that did not finish says so.
3. ``bf16_training``: 300 Adam steps per architecture on binarized-MNIST-shaped synthetic data (a fixed
   set of random blob images with pixel noise), in bf16 autocast: the loss must decrease (last 20 steps'
   mean below the first 20's) and the trained model's validation NLL in bf16 must be finite and equal
   its float32 NLL within 1% (``nll_tolerance``).
4. ``sampling``: cached vs naive sampling, images/s at batches 16 and 256 (MNIST sizes; the cached
   sampler timed over its first rows, the naive one over its first 28 steps, both extrapolated).
5. ``ddp`` (two or more GPUs): ``train.py trainer=ddp`` on the bundled digits for a few steps, then the
   final checkpoint evaluated by one process and by two: the validation NLL must be equal (within 1e-5 nats).

Every section has a share of the budget and every case checks the time left before it starts; what is
skipped is reported as skipped. Without a CUDA GPU the script exits at once with a message.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MNIST = ("binarized_mnist", [])
CIFAR = {
    "pixelcnn": ["model.net.hidden=128", "model.net.num_layers=15", "model.net.output_hidden=1024"],
    "row_lstm": ["model.net.hidden=128", "model.net.num_layers=12", "model.net.output_hidden=1024"],
    "diag_bilstm": ["model.net.hidden=128", "model.net.num_layers=12", "model.net.output_hidden=1024"],
}
ARCHS = ["pixelcnn", "row_lstm", "diag_bilstm"]
# --smoke (a test of this script's code paths, on CPU, at tiny sizes): the device and the sizes.
DEVICE = "cuda"
SMOKE: list[str] = []
# Section shares of the budget; compiled throughput runs last and gets what is left (on one GPU, that
# includes the DDP share).
SHARES = {"throughput": 0.22, "bf16_training": 0.2, "sampling": 0.07, "ddp": 0.23}


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu_check.py: no CUDA GPU is available (torch.cuda.is_available() is False); this check "
            "measures GPU training and sampling, run it on a machine with a GPU. On CPU use "
            "benchmarks/train_throughput.py and benchmarks/sampling.py.",
            file=sys.stderr,
        )
        raise SystemExit(2)


class Report:
    def __init__(self, path: str | None):
        self.path = path

    def __call__(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_allocated() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0


def build(arch: str, data: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={arch}", f"data={data}", *overrides, *SMOKE])
    return instantiate(cfg.model), cfg.data


def sizes(arch: str, shape: str):
    return ("binarized_mnist", []) if shape == "mnist_paper" else ("cifar10", CIFAR[arch])


def time_training(arch: str, shape: str, precision: str, compiled: bool, batch: int, steps: int = 10) -> dict:
    data, overrides = sizes(arch, shape)
    module, data_cfg = build(arch, data, overrides)
    module = module.to(DEVICE).train()
    if compiled:
        module.net.compile()
    c, k, s = data_cfg.num_channels, data_cfg.num_levels, data_cfg.image_size
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(levels):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = module.nll(levels).mean()
        loss.backward()
        optimizer.step()
        return loss

    def peak(b: int) -> int:
        levels = torch.randint(0, k, (b, c, s, s), device=DEVICE)
        step(levels)
        synchronize()
        reset_peak()
        step(levels)
        synchronize()
        return peak_allocated()

    first = time.perf_counter()
    levels = torch.randint(0, k, (batch, c, s, s), device=DEVICE)
    loss = step(levels)  # compiles, if compiled
    synchronize()
    warmup_s = time.perf_counter() - first
    for _ in range(2):
        step(levels)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(levels)
    synchronize()
    seconds = (time.perf_counter() - start) / steps
    per_image = (peak(batch) - peak(batch // 2)) / (batch - batch // 2)
    return {
        "batch": batch,
        "step_ms": round(seconds * 1e3, 2),
        "images_per_s": round(batch / seconds, 1),
        "peak_mib_per_image": round(per_image / 2**20, 2),
        "first_step_s": round(warmup_s, 1),
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


BATCH = {"mnist_paper": 64, "cifar10_paper": 16}


def throughput(report, clock: Clock, share: float, compiled: bool = False, archs=ARCHS) -> None:
    end = clock.left() - share
    for arch in archs:
        for shape in ("mnist_paper", "cifar10_paper"):
            for precision in ("fp32", "bf16"):
                case = {"section": "throughput_compiled" if compiled else "throughput", "arch": arch}
                case |= {"shape": shape, "precision": precision}
                if clock.left() < end + 5:
                    report({**case, "status": "skipped: section budget spent"})
                    continue
                try:
                    report(
                        {
                            **case,
                            "status": "ok",
                            **time_training(arch, shape, precision, compiled, BATCH[shape]),
                        }
                    )
                except Exception as error:  # one failing case must not hide the others
                    report({**case, "status": f"error: {type(error).__name__}: {error}"[:500]})
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()


def throughput_compiled(report, clock: Clock, share: float) -> None:
    """One child process per architecture, killed at its share of the section's budget."""
    per_arch = share / len(ARCHS)
    for arch in ARCHS:
        limit = min(per_arch, clock.left() - 5)
        if limit < 20:
            report({"section": "throughput_compiled", "arch": arch, "status": "skipped: budget spent"})
            continue
        command = [sys.executable, __file__, "--compiled-worker", arch, "--budget", str(limit)]
        command += ["--smoke"] if DEVICE == "cpu" else []
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            lines, note = out.stdout.splitlines(), "" if out.returncode == 0 else out.stderr[-300:]
        except subprocess.TimeoutExpired as expired:
            lines = (expired.stdout or b"").decode().splitlines() if expired.stdout else []
            note = f"timed out after {limit:.0f} s, compilation included; the cases above finished"
        for line in lines:
            if line.startswith("{"):
                report(json.loads(line))
        if note:
            report({"section": "throughput_compiled", "arch": arch, "status": "incomplete", "note": note})


def synthetic_binary_images(n: int, generator) -> torch.Tensor:
    """Binarized-MNIST-shaped data with structure to learn: 16 random smooth blobs, 5% pixels flipped."""
    import torch.nn.functional as F

    prototypes = F.avg_pool2d(torch.rand(16, 1, 28, 28, generator=generator), 7, 1, 3) > 0.5
    images = prototypes[torch.randint(0, 16, (n,), generator=generator)]
    flips = torch.rand(images.shape, generator=generator) < 0.05
    return (images ^ flips).long()


def bf16_training(report, clock: Clock, share: float, steps: int = 300, tolerance: float = 0.01) -> None:
    end = clock.left() - share
    generator = torch.Generator().manual_seed(0)
    train, val = (
        synthetic_binary_images(4096, generator).to(DEVICE),
        synthetic_binary_images(256, generator).to(DEVICE),
    )
    for arch in ARCHS:
        case = {"section": "bf16_training", "arch": arch, "shape": "mnist_paper", "steps": steps}
        if clock.left() < end + 10:
            report({**case, "status": "skipped: section budget spent"})
            continue
        torch.manual_seed(0)
        module, _ = build(arch, "binarized_mnist", [])
        module = module.to(DEVICE).train()
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        losses, start = [], time.perf_counter()
        for _ in range(steps):
            batch = train[torch.randint(0, len(train), (32,), device=DEVICE)]
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = module.nll(batch).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if clock.left() < end:
                break
        module.eval()
        with torch.no_grad():
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                nll_bf16 = module.nll(val).mean().item()
            nll_fp32 = module.nll(val).mean().item()
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        relative = abs(nll_bf16 - nll_fp32) / abs(nll_fp32)
        ok = (
            len(losses) == steps
            and last < first
            and relative <= tolerance
            and torch.isfinite(torch.tensor(nll_bf16))
        )
        report(
            {
                **case,
                "status": "ok" if ok else "FAILED",
                "steps_run": len(losses),
                "seconds": round(time.perf_counter() - start, 1),
                "loss_first20": round(first, 3),
                "loss_last20": round(last, 3),
                "val_nll_bf16": round(nll_bf16, 4),
                "val_nll_fp32": round(nll_fp32, 4),
                "relative_difference": round(relative, 5),
                "nll_tolerance": tolerance,
            }
        )


def sampling(report, clock: Clock, share: float) -> None:
    from benchmarks.sampling import time_cached, time_naive
    from pixel_models.sampling.generate import uniform_noise

    end = clock.left() - share
    for arch in ARCHS:
        module, data_cfg = build(arch, "binarized_mnist", [])
        net = module.net.to(DEVICE).eval()
        for batch in (16, 256):
            case = {"section": "sampling", "arch": arch, "shape": "mnist_paper", "batch": batch}
            if clock.left() < end + 3:
                report({**case, "status": "skipped: section budget spent"})
                continue
            noise = uniform_noise(batch, 1, 28, 28, seed=0).to(DEVICE)
            with torch.no_grad():
                cached, rows = time_cached(net, noise, data_cfg.num_levels, rows=4)
                naive, naive_steps = time_naive(net, noise, data_cfg.num_levels, steps=28)
            synchronize()
            report(
                {
                    **case,
                    "status": "ok",
                    "cached_images_per_s": round(batch / (cached * 784), 2),
                    "naive_images_per_s": round(batch / (naive * 784), 3),
                    "speedup": round(naive / cached, 1),
                    "cached_rows_timed": rows,
                    "naive_steps_timed": naive_steps,
                }
            )


def ddp(report, clock: Clock, share: float) -> None:
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        report({"section": "ddp", "status": f"skipped: {torch.cuda.device_count()} GPU (needs 2 or more)"})
        return
    limit = max(30.0, min(share, clock.left() - 5) / 3)
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            "data=digits",
            "logger=csv",
            "test=false",
            "final_samples=0",
            "callbacks.sample_grid=null",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={tmp}/train",
        ]
        runs = {
            "train_ddp": ["trainer=ddp", "trainer.devices=2", "trainer.max_steps=40", *common],
        }
        ckpt = f"{tmp}/train/checkpoints/last.ckpt"
        runs["eval_one_process"] = [
            "trainer=gpu",
            "train=false",
            f"ckpt_path={ckpt}",
            *common[:-1],
            f"hydra.run.dir={tmp}/one",
        ]
        runs["eval_two_processes"] = [
            "trainer=ddp",
            "trainer.devices=2",
            "train=false",
            f"ckpt_path={ckpt}",
            *common[:-1],
            f"hydra.run.dir={tmp}/two",
        ]
        results = {}
        for name, overrides in runs.items():
            try:
                out = subprocess.run(
                    [sys.executable, "train.py", *overrides],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=limit,
                )
            except subprocess.TimeoutExpired:
                report({"section": "ddp", "run": name, "status": f"timed out after {limit:.0f} s"})
                return
            if out.returncode != 0:
                report({"section": "ddp", "run": name, "status": "error", "stderr": out.stderr[-800:]})
                return
            run_dir = (
                Path(tmp)
                / {"train_ddp": "train", "eval_one_process": "one", "eval_two_processes": "two"}[name]
            )
            results[name] = json.loads((run_dir / "metrics.json").read_text())
        one = _val_nll(results["eval_one_process"])
        two = _val_nll(results["eval_two_processes"])
        report(
            {
                "section": "ddp",
                "status": "ok" if one is not None and two is not None and abs(one - two) < 1e-5 else "FAILED",
                "val_nll_one_process": one,
                "val_nll_two_processes": two,
            }
        )


def _val_nll(metrics: dict):
    for key in ("val/nll", "val_nll", "nll"):
        if key in metrics:
            return float(metrics[key])
    val = metrics.get("val")
    return float(val["nll"]) if isinstance(val, dict) and "nll" in val else None


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds for the whole check (default 450)"
    )
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--compiled-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--smoke", action="store_true", help="check this script on CPU: every section at tiny sizes"
    )
    args = parser.parse_args()
    if args.smoke:  # the script's own test: every section on CPU at tiny sizes, no timing worth reading
        global DEVICE, SMOKE
        DEVICE, SMOKE = "cpu", ["model.net.hidden=3", "model.net.num_layers=1", "model.net.output_hidden=6"]
        CIFAR.update({arch: [] for arch in CIFAR})
        BATCH.update({"mnist_paper": 4, "cifar10_paper": 2})
    else:
        refuse_without_gpu()
    report, clock = Report(args.out), Clock(args.budget)
    if args.compiled_worker:
        return throughput(report, clock, args.budget, compiled=True, archs=[args.compiled_worker])
    report(
        {
            "section": "device",
            "gpus": torch.cuda.device_count(),
            "name": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (--smoke)",
            "torch": torch.__version__,
            "budget_s": args.budget,
        }
    )
    torch.backends.cudnn.benchmark = True
    throughput(report, clock, SHARES["throughput"] * args.budget)
    bf16_training(report, clock, SHARES["bf16_training"] * args.budget)
    sampling(report, clock, SHARES["sampling"] * args.budget)
    ddp(report, clock, SHARES["ddp"] * args.budget)
    throughput_compiled(report, clock, clock.left() - 10)
    report({"section": "done", "seconds": round(args.budget - clock.left(), 1)})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    main()
