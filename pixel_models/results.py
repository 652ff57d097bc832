"""One results table from run folders: ``python -m pixel_models.results <folder> [<folder> ...]``.

Every ``metrics.json`` under the folders (single runs, ``-m`` sweeps, Optuna searches) is one row, with
the run's Hydra config (``.hydra/config.yaml``, ``.hydra/hydra.yaml``) read as plain YAML: interpolations
stay text, nothing is resolved, instantiated or imported. Prints a Markdown table; ``--csv FILE`` and
``--markdown FILE`` also write them.

    python -m pixel_models.results outputs/train
    python -m pixel_models.results outputs/train/multiruns/<date> --csv results.csv

Columns: the run folder, model and data (the config choices), steps and epochs trained, parameters, the
best checkpoint's epoch, validation NLL (nats per image) and bits/dim, test NLL and bits/dim (of the same
checkpoint), and the checkpoint's path (relative to the run folder when inside it). A ``metrics.json``
written before numbers were labelled by checkpoint (whose ``val/bpd`` may be another epoch's than
``val/nll``) is marked in ``note``.
"""

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

import yaml

COLUMNS = [
    ("run", "run"),
    ("model", "model"),
    ("data", "data"),
    ("steps", "steps"),
    ("epochs", "epochs"),
    ("params", "params"),
    ("best_epoch", "best epoch"),
    ("val_nll", "val NLL (nats)"),
    ("val_bpd", "val bits/dim"),
    ("test_nll", "test NLL (nats)"),
    ("test_bpd", "test bits/dim"),
    ("checkpoint", "checkpoint"),
    ("note", "note"),
]


def _yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _get(tree: dict, *keys):
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _plain(value):
    """A config value as written, unless it is an unresolved interpolation (then unknown)."""
    return None if isinstance(value, str) and "${" in value else value


def _number(value):
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _inside(path, run_dir: Path):
    """A checkpoint path relative to its run folder when it lies inside it (tables stay readable)."""
    if not isinstance(path, str):
        return None
    try:
        return str(Path(path).resolve().relative_to(run_dir.resolve()))
    except (ValueError, OSError):
        return path


def run_row(metrics_path: Path, root: Path) -> dict:
    """One table row from a run's ``metrics.json`` and its Hydra config."""
    metrics = json.loads(metrics_path.read_text())
    if not isinstance(metrics, dict):
        raise ValueError("not a JSON object")
    run_dir = metrics_path.parent
    config = _yaml(run_dir / ".hydra" / "config.yaml")
    choices = _get(_yaml(run_dir / ".hydra" / "hydra.yaml"), "hydra", "runtime", "choices") or {}
    target = _plain(_get(config, "data", "_target_"))
    data = choices.get("data") or (target.rsplit(".", 1)[-1] if isinstance(target, str) else None)
    model = choices.get("model") or _plain(_get(config, "model", "net", "arch"))
    if choices.get("experiment"):
        model = f"{model} ({choices['experiment']})"

    row = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "model": model,
        "data": data,
        "steps": _number(metrics.get("global_step")),
        "epochs": _number(metrics.get("epochs")),
        "params": _number(metrics.get("params")),
        "best_epoch": _number(metrics.get("best/epoch", metrics.get("epoch"))),
        "val_nll": _number(metrics.get("val/nll")),
        "val_bpd": _number(metrics.get("val/bpd")),
        "test_nll": _number(metrics.get("test/nll")),
        "test_bpd": _number(metrics.get("test/bpd")),
        "checkpoint": _inside(metrics.get("best/checkpoint", metrics.get("checkpoint")), run_dir),
        "note": "",
    }
    # bits/dim must be the same measurement as the NLL: nll / (C H W ln 2)
    dims = [_number(_plain(_get(config, "data", k))) for k in ("num_channels", "image_size")]
    if all(dims):
        per_image = dims[0] * dims[1] ** 2 * math.log(2)
        for split in ("val", "test"):
            nll, bpd = row[f"{split}_nll"], row[f"{split}_bpd"]
            if nll is not None and bpd is not None and not math.isclose(nll / per_image, bpd, rel_tol=1e-6):
                row["note"] += (
                    f"{split} bits/dim is not this NLL's (metrics.json from before labelled reports) "
                )
    row["note"] = row["note"].strip()
    return row


def collect(folders: list[Path]) -> tuple[list[dict], list[str]]:
    """Rows of every run under ``folders``, and a line for each metrics.json that could not be read."""
    rows, problems = [], []
    for folder in folders:
        for path in sorted(folder.rglob("metrics.json")):
            try:
                rows.append(run_row(path, folder))
            except (OSError, ValueError, UnicodeDecodeError) as err:
                problems.append(f"skipped {path}: {err}")
    return rows, problems


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if key.endswith("_nll") and isinstance(value, float):
        return f"{value:.2f}"
    if key.endswith("_bpd") and isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row[key]).replace("|", "\\|") for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pixel_models.results",
        description="One Markdown / CSV table of the runs (metrics.json + .hydra/) under the given folders.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run, sweep or outputs folders")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV to this file")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    for folder in args.folders:
        if not folder.is_dir():
            print(
                f"error: {folder} is not a folder; pass run or sweep folders (e.g. outputs/train)",
                file=sys.stderr,
            )
            return 2
    rows, problems = collect(args.folders)
    for line in problems:
        print(line, file=sys.stderr)
    if not rows:
        print(f"error: no metrics.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    table = markdown(rows)
    print(table, end="")
    if args.markdown:
        args.markdown.write_text(table)
    if args.csv:
        args.csv.write_text(to_csv(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
