"""Training throughput: one full training step (forward, backward, Adam update), and peak memory.

One JSON line per case, then lines of ratios from the same run (machines are noisy; compare within a
run). Every case runs in its own process, built from the Hydra configs users train with
(`conf/model/<name>.yaml`, MNIST setup: 7 layers, h=16, 32 output maps), and reports wall-clock and
CPU time per step; ratios use CPU time (process time), which another program on a busy machine
inflates far less than wall-clock time.

    python benchmarks/train_throughput.py                       # this checkout
    python benchmarks/train_throughput.py --baseline main       # and the code of a git revision,
                                                                # alternated case by case in one run
    python benchmarks/train_throughput.py --memory              # + peak memory at CIFAR-10 sizes
    python benchmarks/train_throughput.py --shapes mnist_28x28x1_k2 --models pixelcnn row_lstm   # some cases

Shapes: binarized MNIST 28x28x1 K=2, and CIFAR-10 32x32x3 K=256 at the same reduced MNIST widths
(--cifar-hidden / --cifar-output change them). PixelCNN++ runs at its own config
(`conf/model/pixelcnn_pp.yaml`: 32 filters, 2 blocks per stage, 3 stages, logistic mixture of 10);
--pp-filters / --pp-resnet change it. Every speed case also reports ``gflop_per_step`` (the
step's convolutions and matrix products, counted by torch's FlopCounterMode, 2 FLOPs per multiply-add)
and ``gflop_per_s`` (per CPU second), and the ``flop_ratio`` lines give the ratios the step times would
have at equal speed per FLOP. ``--compile`` times ``net.compile()``d networks, as ``compile=true``
(compiling takes a minute per case). Every speed case also reports ``saved_mb_per_image``, what
autograd keeps for the backward pass per image (every tensor saved by a forward op, counted once per
storage), the same on any device; on a GPU, ``cuda_peak_mb_per_image`` is the allocator's peak;
``recurrence_tanh``, how the code under test computes the recurrences' tanh on this machine.
`--memory`: peak training memory per image of the
paper's CIFAR-10 networks (12 layers, h=128, 1024 output maps; PixelCNN 15 layers) at 32x32x3,
with and without `checkpoint_recurrence`, at batch 2 minus batch 1 (weights, gradients and Adam state,
paid once, cancel out), measured on CPU two ways: ``activations_mib_per_image``, the C heap in use
(glibc mallinfo2) at the end of the forward pass minus before it, i.e. what is kept for the backward
pass, where training memory peaks; ``rss_peak_growth_mib_per_image``, the growth of the process's peak
resident set (getrusage ru_maxrss) over the step, which the allocator's caching blurs.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A sibling of this script: the root stays off the path, so a worker imports only the code under --code.
from model_options import MODELS, add_width_options, width_overrides

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"mnist_28x28x1_k2": "binarized_mnist", "cifar10_32x32x3_k256": "cifar10"}
PAPER_CIFAR = {
    "row_lstm": ["model.net.hidden=128", "model.net.num_layers=12", "model.net.output_hidden=1024"],
    "diag_bilstm": ["model.net.hidden=128", "model.net.num_layers=12", "model.net.output_hidden=1024"],
    "pixelcnn": ["model.net.hidden=128", "model.net.num_layers=15", "model.net.output_hidden=1024"],
}


def worker(args) -> None:
    """Build one model from the code at ``args.code``, time or measure it, print one JSON line."""
    sys.path.insert(0, args.code)
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # As train.py does by default (reuse_freed_memory=true), where the code under test has it.
    try:
        from pixel_models.training.allocator import reuse_freed_memory
    except ImportError:
        reuse_freed_memory = None
    allocator = "glibc defaults"
    if reuse_freed_memory is not None and not args.default_allocator:
        allocator = reuse_freed_memory()
    with initialize_config_dir(config_dir=str(Path(args.code) / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"model={args.model}", f"data={args.data}", *args.override]
        )
    module = instantiate(cfg.model).train()
    c, k, s = cfg.data.num_channels, cfg.data.num_levels, cfg.data.image_size
    levels = torch.randint(0, k, (args.batch, c, s, s))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        module.nll(levels).mean().backward()
        optimizer.step()

    result = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads()}
    result["allocator"] = allocator
    if args.measure == "memory":
        before, heap = _rss_kib(), _heap_in_use()
        optimizer.zero_grad(set_to_none=True)
        loss = module.nll(levels).mean()
        after_forward = _heap_in_use()
        loss.backward()
        optimizer.step()
        result["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        if heap is not None:
            result["retained_kib"] = (after_forward - heap) / 1024
    else:
        saved = saved_bytes_per_image(module, levels)
        flops = training_step_flops(module, levels)
        if args.compile:
            module.net.compile()  # as train.py's compile=true; the warm-up steps below compile it
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            one_step()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            one_step()
        result["step_ms"] = (time.perf_counter() - wall) / args.steps * 1e3
        result["cpu_ms"] = (time.process_time() - cpu) / args.steps * 1e3
        result["saved_mb_per_image"] = round(saved / 2**20, 2)
        result["gflop_per_step"] = round(flops / 1e9, 3)
        result["gflop_per_s"] = round(flops / 1e9 / (result["cpu_ms"] / 1e3), 1)
        result["compiled"] = args.compile
        if torch.cuda.is_available():
            result["cuda_peak_mb_per_image"] = round(
                torch.cuda.max_memory_allocated() / 2**20 / args.batch, 2
            )
        net = dict(module.hparams.net)
        result |= {"hidden": net.get("hidden"), "layers": net.get("num_layers")}
        result["net"] = {k: v for k, v in net.items() if k != "arch"}
        result["output"] = module.hparams.output["name"]
        result["recurrence_tanh"] = _recurrence_tanh(torch)
    print(json.dumps(result), flush=True)


def _recurrence_tanh(torch) -> str | None:
    """How the code under test computes the recurrences' tanh on this machine (it measures which is
    faster; see ``blocks.recurrence.tanh_through_sigmoid``), or None where it has no such choice."""
    try:
        from pixel_models.blocks.recurrence import tanh_through_sigmoid
    except ImportError:
        return None
    return "2 sigmoid(2x) - 1" if tanh_through_sigmoid(torch.empty(1)) else "torch.tanh"


def training_step_flops(module, levels) -> int:
    """FLOPs of one training step's forward and backward pass: every convolution and matrix product, as
    torch's FlopCounterMode counts them (2 per multiply-add), including the in-place products of the
    recurrences, registered here too so that a --baseline revision without the registration counts alike."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

    aten = torch.ops.aten
    for in_place, counted in ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm)):
        if in_place not in flop_registry:
            register_flop_formula(in_place, get_raw=True)(flop_registry[counted])
    with FlopCounterMode(display=False) as counter:
        module.nll(levels).mean().backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_bytes_per_image(module, levels) -> float:
    """Bytes autograd saves for backward in one forward pass, per image (each storage once)."""
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.nll(levels).mean()
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in parameters) / len(levels)


def _heap_in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back (glibc mallinfo2), or None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_worker(code: str, model: str, data: str, batch: int, overrides: list[str], args, measure="time"):
    command = [sys.executable, __file__, "--worker", "--code", code, "--model", model, "--data", data]
    command += ["--batch", str(batch), "--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--measure", measure, *[f"--override={o}" for o in overrides]]
    if args.default_allocator:
        command.append("--default-allocator")
    command += ["--compile"] if args.compile else []
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark case {model}/{data} ({code}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_revision(revision: str, into: Path) -> str:
    """The package and configs of a git revision, extracted into ``into`` (for --baseline)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "pixel_models", "conf"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"--baseline {revision}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def speed(args, codes: dict[str, str]) -> None:
    for shape in args.shapes:
        data = SHAPES[shape]
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.rounds):  # alternate code versions and models, keep each case's fastest round
            for model in args.models:
                for name, code in codes.items():
                    r = run_worker(code, model, data, args.batch, width_overrides(model, data, args), args)
                    key = (name, model)
                    if key not in best or r["cpu_ms"] < best[key]["cpu_ms"]:
                        best[key] = r
        for (name, model), r in best.items():
            emit(
                {
                    "case": f"train/{model}/{shape}",
                    "code": name,
                    "batch": args.batch,
                    "step_ms": round(r["step_ms"], 1),
                    "cpu_ms": round(r["cpu_ms"], 1),
                    "images_per_s": round(args.batch / r["cpu_ms"] * 1e3, 1),
                    "threads": r["threads"],
                    "rounds": args.rounds,
                    **{
                        k: r[k]
                        for k in (
                            "gflop_per_step",
                            "gflop_per_s",
                            "compiled",
                            "saved_mb_per_image",
                            "cuda_peak_mb_per_image",
                            "allocator",
                            "recurrence_tanh",
                        )
                        if k in r
                    },
                    **{k: r.get(k) for k in ("hidden", "layers", "net", "output")},
                }
            )
        for name in codes:
            cpu = {m: best[(name, m)]["cpu_ms"] for m in args.models}
            ratios = {}
            if "pixelcnn" in cpu:
                ratios.update({f"{m}/pixelcnn": round(t / cpu["pixelcnn"], 2) for m, t in cpu.items()})
            if "row_lstm" in cpu and "diag_bilstm" in cpu:
                ratios["diag_bilstm/row_lstm"] = round(cpu["diag_bilstm"] / cpu["row_lstm"], 2)
            emit({"case": f"step_time_ratio/{shape}", "code": name, **ratios})
            flops = {m: best[(name, m)]["gflop_per_step"] for m in args.models}
            if "pixelcnn" in flops:  # what the ratios would be at equal speed per FLOP
                emit(
                    {
                        "case": f"flop_ratio/{shape}",
                        "code": name,
                        **{f"{m}/pixelcnn": round(f / flops["pixelcnn"], 2) for m, f in flops.items()},
                    }
                )
        if "baseline" in codes:
            emit(
                {
                    "case": f"speedup_vs_baseline/{shape}",
                    **{
                        m: round(best[("baseline", m)]["cpu_ms"] / best[("current", m)]["cpu_ms"], 2)
                        for m in args.models
                    },
                }
            )


def memory(args, codes: dict[str, str]) -> None:
    for model in [m for m in args.models if m in PAPER_CIFAR]:
        variants = [("plain", [])]
        if model != "pixelcnn":
            variants.append(("checkpoint_recurrence", ["model.net.checkpoint_recurrence=true"]))
        for name, code in codes.items():
            for variant, extra in variants:
                if name == "baseline" and extra:
                    continue  # the option is new
                overrides = PAPER_CIFAR[model] + extra
                one, two = (run_worker(code, model, "cifar10", b, overrides, args, "memory") for b in (1, 2))
                record = {
                    "case": f"memory/{model}/cifar10_32x32x3_k256_paper",
                    "code": name,
                    "variant": variant,
                }
                if "retained_kib" in two:
                    activations = (two["retained_kib"] - one["retained_kib"]) / 1024
                    record["activations_mib_per_image"] = round(activations, 1)
                record["rss_peak_growth_mib_per_image"] = round((two["peak_kib"] - one["peak_kib"]) / 1024, 1)
                emit(record)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest counts")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--baseline", metavar="REV", help="also time the code of this git revision")
    parser.add_argument("--memory", action="store_true", help="peak memory at the paper's CIFAR-10 sizes")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput cases")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every network, as compile=true (slow to start)"
    )
    add_width_options(parser, hidden_default="config's")
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator at its defaults (train.py reuse_freed_memory=false)",
    )
    # Internal: one case in a fresh process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="time", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"current": str(ROOT)}
        if args.baseline:
            codes["baseline"] = export_revision(args.baseline, Path(tmp))
        if not args.no_speed:
            speed(args, codes)
        if args.memory:
            memory(args, codes)


if __name__ == "__main__":
    main()
