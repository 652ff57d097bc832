"""Loading checkpoints safely: ``weights_only=True`` always, one clear error for anything else."""

import os
import pickle
import zipfile

import torch

from pixel_models.module import AutoregressiveModule


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
    ckpt = load_checkpoint(path)
    module = AutoregressiveModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
