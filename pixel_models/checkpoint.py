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
        raise CheckpointError(f"checkpoint not found: {path}; pass ckpt_path=<a .ckpt file written by train.py>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable pixel-models checkpoint (truncated, corrupt, or carrying code that "
            f"weights_only loading refuses): {first_line}"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path} is not a pixel-models checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def load_module(path: str | os.PathLike) -> AutoregressiveModule:
    """Rebuild the trained AutoregressiveModule of a checkpoint, in eval mode on the CPU."""
    ckpt = load_checkpoint(path)
    module = AutoregressiveModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
