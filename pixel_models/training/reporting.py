"""The final report of a run: the log lines and ``<run dir>/metrics.json``.

Numbers reported together belong together: each log line names the checkpoint (or validation) its
nats and bits/dim come from.
"""

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("train")


def _where(metrics: dict, prefix: str) -> str:
    parts = [
        f"{name} {metrics[f'{prefix}{name}']}"
        for name in ("epoch", "global_step")
        if metrics.get(f"{prefix}{name}") is not None
    ]
    return ", ".join(parts).replace("global_step", "step")


def _nll_line(metrics: dict, stage: str) -> str:
    count = metrics.get(f"{stage}/num_images")
    over = f" over {int(count)} images" if count is not None else ""
    bpd = metrics.get(f"{stage}/bpd")
    bits = f" = {bpd:.6f} bits/dim" if bpd is not None else ""
    return f"{metrics[f'{stage}/nll']:.6f} nats/image{bits}{over}"


def report(metrics: dict, output_dir: str | None, extra: dict) -> None:
    metrics = {**metrics, **extra}
    trained = "best/checkpoint" in metrics
    where = _where(metrics, "best/" if trained else "")
    whose = ("best checkpoint" if trained else "checkpoint") + (f", {where}" if where else "")
    for stage, name in (("val", "validation"), ("test", "test")):
        if f"{stage}/nll" in metrics:
            log.info(f"{name} NLL: {_nll_line(metrics, stage)} ({whose})")
    if "last/val/nll" in metrics:
        log.info(f"last validation ({_where(metrics, 'last/')}): {_nll_line(metrics, 'last/val')}")
    if "last/train/nll" in metrics:
        log.info(
            f"last epoch's training NLL: {metrics['last/train/nll']:.6f} nats/image (mean over its batches)"
        )
    for name in sorted(metrics):
        value = metrics[name]
        log.info(f"{name} = {value:.6g}" if isinstance(value, float) else f"{name} = {value}")
    if output_dir:
        path = Path(output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = {
            k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()
        }
        path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
