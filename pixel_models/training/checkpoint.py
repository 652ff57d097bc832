"""Loading checkpoints safely: ``weights_only=True`` always, one clear error for anything else."""

import math
import os
import pickle
import zipfile

import torch

from pixel_models.training.module import AutoregressiveModule


class CheckpointError(RuntimeError):
    pass


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, read with ``weights_only=True`` (a pickle carrying code is refused unrun)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint not found: {path}; pass ckpt_path=<a .ckpt file written by train.py>"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable pixel-models checkpoint: {_why(err)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a pixel-models checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def _why(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Weights only load failed" in str(err):
        named = [line for line in lines if "GLOBAL" in line]
        if named:
            return (
                f"it refers to code that loading with weights_only=True refuses, so nothing in it was run "
                f"({named[0]})"
            )
        detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
        return (
            f"it is not a file that torch.save wrote, or holds objects that loading with weights_only=True "
            f"refuses (nothing in it was run; {detail})"
        )
    detail = lines[0].split(". ")[0] if lines else type(err).__name__
    return f"it is truncated or corrupt ({detail})"


def load_module(path: str | os.PathLike) -> AutoregressiveModule:
    """Rebuild the trained AutoregressiveModule of a checkpoint, in eval mode on the CPU."""
    return module_from_checkpoint(load_checkpoint(path)).eval()


ARCHITECTURE_KEYS = (
    "net",
    "num_channels",
    "num_levels",
    "image_size",
    "output",
    "conditional",
    "num_classes",
)


def module_from_checkpoint(ckpt: dict) -> AutoregressiveModule:
    """The module of a checkpoint already read by ``load_checkpoint``, with its weights."""
    module = AutoregressiveModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


def check_resume_matches(model: AutoregressiveModule, ckpt: dict, ckpt_path: str) -> None:
    saved = ckpt["hyper_parameters"]
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != model.hparams[key]:
            raise ValueError(
                f"{ckpt_path} was trained with model {key}={saved[key]}, the config gives "
                f"{model.hparams[key]}: resume with the model settings it was trained with (or evaluate it "
                f"with train=false)"
            )
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(
            f"{ckpt_path} holds weights only, no training state to resume from: evaluate it with train=false"
        )


def check_data_matches(model: AutoregressiveModule, datamodule, ckpt: dict | None) -> None:
    for key in ("num_channels", "num_levels", "image_size"):
        expected, actual = getattr(model, key), getattr(datamodule, key, None)
        if actual is not None and expected != actual:
            trained_on = (ckpt or {}).get("data_config", {}).get("_target_")
            hint = f" (it was trained on {trained_on}: pick that data config)" if trained_on else ""
            raise ValueError(f"the model has {key}={expected} but the data gives {key}={actual}{hint}")


def best_score(checkpointing) -> float | None:
    """The best monitored value; read back from the best checkpoint where a spawned process found it."""
    if checkpointing is None:
        return None
    if checkpointing.best_model_score is not None:
        return float(checkpointing.best_model_score)
    if checkpointing.best_model_path and os.path.isfile(checkpointing.best_model_path):
        states = load_checkpoint(checkpointing.best_model_path).get("callbacks", {})
        for key, state in states.items():
            if key.startswith("ModelCheckpoint") and state.get("best_model_score") is not None:
                return float(state["best_model_score"])
    return None


def stored_val_result(ckpt: dict) -> dict | None:
    """The exact validation result a checkpoint's own weights got while training, or None.

    ``AutoregressiveModule`` writes its last validation result into every checkpoint; it belongs to these
    weights only when it was computed at the checkpoint's step (a checkpoint written between
    validations, e.g. on SIGTERM, carries an older one). Values are checked: the file is untrusted.
    """
    result = (ckpt.get("split_results") or {}).get("val")
    if not isinstance(result, dict):
        return None
    numbers = {k: result.get(k) for k in ("nll", "bpd", "num_images", "epoch", "global_step")}
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers.values()):
        return None
    if numbers["global_step"] != ckpt.get("global_step"):
        return None
    per_class = result.get("nll_per_class")
    if isinstance(per_class, dict) and all(
        isinstance(k, str) and k.isdigit() and isinstance(v, float) and math.isfinite(v)
        for k, v in per_class.items()
    ):
        numbers["nll_per_class"] = dict(per_class)
    return numbers
