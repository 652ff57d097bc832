"""The final report of a run: the log lines and ``<run dir>/metrics.json``."""

import json
import logging
import math
from pathlib import Path

log = logging.getLogger("train")


def report(metrics: dict, output_dir: str | None, extra: dict) -> None:
    for stage, name in (("val", "validation"), ("test", "test")):
        if f"{stage}/nll" in metrics:
            count = metrics.get(f"{stage}/num_images")
            over = f" over {int(count)} images" if count is not None else ""
            log.info(
                f"{name} NLL: {metrics[f'{stage}/nll']:.6f} nats/image = "
                f"{metrics.get(f'{stage}/bpd', float('nan')):.6f} bits/dim{over}"
            )
    for name in sorted(metrics):
        log.info(f"{name} = {metrics[name]:.6g}")
    if output_dir:
        path = Path(output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        path.write_text(json.dumps({**clean, **extra}, indent=2, sort_keys=True) + "\n")
