"""Loading checkpoints safely. Every checkpoint is an untrusted file:

- it is read with ``torch.load(weights_only=True)``, so a pickle carrying code is refused without running
  it, and any failure to parse it (truncated, random bytes, bit flips) is one :class:`CheckpointError`
  naming the file;
- its digest (:func:`digest`, written by ``AtomicCheckpointIO`` into every checkpoint train.py saves) must
  match its contents, so a corrupted file is reported as corrupt rather than loaded;
- its ``hyper_parameters`` are checked against the registry of architectures, exact types and sane bounds,
  and the network is first built on the ``meta`` device (no memory) to count what it would allocate, before
  anything real is allocated;
- its ``data_config`` is never instantiated as written: it names one of the project's own data modules
  (:data:`DATA_MODULES`) and holds plain values of that module's known parameters.

Checkpoint format versions (``checkpoint["pixel_models"]["format"]``): 1 = written before digests existed
(no ``pixel_models`` entry; loaded with a one-line warning, as their integrity cannot be checked); 2 = with
a sha256 digest. A format newer than :data:`FORMAT_VERSION` is refused.
"""

import hashlib
import inspect
import logging
import math
import os
import re
import shutil
import typing
import uuid
from collections.abc import Mapping

import torch

from datamodules import (
    BinarizedMNISTDataModule,
    CIFAR10DataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    ImageNet32DataModule,
    ImageNet64DataModule,
    MNISTDataModule,
)
from pixel_models.architectures import ARCHITECTURES
from pixel_models.distributions import DISTRIBUTIONS
from pixel_models.training.module import OPTIMIZERS, AutoregressiveModule

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
FORMAT_KEY = "pixel_models"
# Parameters plus buffers the network of a checkpoint (or a config) may have: 1e9 float32 values are 4 GB.
MAX_ELEMENTS = 1_000_000_000

# conf/data/<name>.yaml -> the data module class it builds (tests/test_checkpoint_safety.py checks that
# every conf/data option is here).
DATA_MODULES = {
    "digits": DigitsDataModule,
    "binarized_mnist": BinarizedMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "imagenet32": ImageNet32DataModule,
    "imagenet64": ImageNet64DataModule,
    "image_folder": ImageFolderDataModule,
}


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, or holds something we refuse to use."""


# ---------------------------------------------------------------------------------------------- digest
def _feed(h, value) -> None:
    """Feeds a canonical encoding of a checkpoint value (dicts by sorted key, tensors by bytes) to ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(f"D{len(value)}:".encode())
        for key in sorted(value, key=repr):
            h.update(f"K{key!r}:".encode())
            _feed(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"L{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"V{type(value).__name__}{value!r};".encode())


def digest(checkpoint: Mapping) -> str:
    """sha256 over everything in a checkpoint (weights, optimizer state, hyper-parameters, loops, ...)
    except the digest entry itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != FORMAT_KEY})
    return h.hexdigest()


def with_digest(checkpoint: dict) -> dict:
    """A shallow copy of ``checkpoint`` carrying its format version and digest."""
    return {**checkpoint, FORMAT_KEY: {"format": FORMAT_VERSION, "digest": digest(checkpoint)}}


# ----------------------------------------------------------------------------------------------- reading
def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint's dict, read with ``weights_only=True`` and its digest checked."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"checkpoint not found: {path}; pass ckpt_path=<a .ckpt file written by train.py>"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise CheckpointError(f"{path} is not a readable pixel-models checkpoint: it is corrupt") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse an untrusted file is this one error
        raise CheckpointError(f"{path} is not a readable pixel-models checkpoint: {_why(err)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a pixel-models checkpoint (no state_dict / hyper_parameters)")
    if not isinstance(ckpt.get("hyper_parameters"), dict):
        raise CheckpointError(f"{path} is not a pixel-models checkpoint (no state_dict / hyper_parameters)")
    _check_digest(ckpt, path)
    return ckpt


def _check_digest(ckpt: dict, path: str) -> None:
    stamp = ckpt.get(FORMAT_KEY)
    if stamp is None:
        log.warning(
            f"{path} has no digest (checkpoint format 1, written before format {FORMAT_VERSION}): its "
            f"integrity cannot be checked"
        )
        return
    if not (
        isinstance(stamp, dict) and type(stamp.get("format")) is int and isinstance(stamp.get("digest"), str)
    ):
        raise CheckpointError(f"{path} is corrupt (its format entry is damaged)")
    if stamp["format"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {stamp['format']}, newer than this pixel-models reads "
            f"({FORMAT_VERSION}): update pixel-models"
        )
    if stamp["digest"] != digest(ckpt):
        raise CheckpointError(f"{path} is corrupt (its digest does not match)")


def _why(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Weights only load failed" in str(err):
        named = [line for line in lines if "GLOBAL" in line]
        if named:
            return (
                f"it refers to code that loading with weights_only=True refuses, so nothing in it was run "
                f"({named[0][:200]})"
            )
        detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
        return (
            f"it is not a file that torch.save wrote, or holds objects that loading with weights_only=True "
            f"refuses (nothing in it was run; {detail[:200]})"
        )
    detail = lines[0].split(". ")[0][:200] if lines else type(err).__name__
    return f"it is truncated or corrupt ({type(err).__name__}: {detail})"


def load_module(path: str | os.PathLike) -> AutoregressiveModule:
    """Rebuild the trained AutoregressiveModule of a checkpoint, in eval mode on the CPU."""
    path = os.fspath(path)
    return module_from_checkpoint(load_checkpoint(path), path).eval()


# ------------------------------------------------------------------------------ hyper-parameter checks
ARCHITECTURE_KEYS = (
    "net",
    "num_channels",
    "num_levels",
    "image_size",
    "output",
    "conditional",
    "num_classes",
)

# Integer settings: (lowest, highest). Anything else an int may be is bounded by GENERIC_INT.
INT_BOUNDS = {
    "num_channels": (1, 3),
    "num_levels": (2, 65536),
    "image_size": (1, 1024),
    "num_classes": (0, 100_000),
    "net.hidden": (1, 4096),
    "net.output_hidden": (1, 4096),
    "net.num_layers": (0, 256),
    "net.num_output_layers": (1, 64),
    "net.kernel_size": (1, 31),
    "output.num_mixtures": (1, 1024),
}
GENERIC_INT = (0, 1_000_000)
FLOAT_BOUNDS = {  # (lowest, highest, lowest allowed?)
    "optimizer.lr": (0.0, 1e3, False),
    "optimizer.weight_decay": (0.0, 1e3, True),
    "label_dropout": (0.0, 1.0, True),
}
NESTED = ("net", "optimizer", "scheduler", "output")


def _check_scalar(key: str, value, where: str) -> None:
    if value is None or isinstance(value, bool) or (key in FLOAT_BOUNDS and type(value) in (int, float)):
        return  # (numbers with their own bounds are checked below)
    if isinstance(value, int):
        lo, hi = INT_BOUNDS.get(key, GENERIC_INT)
        if not lo <= value <= hi:
            raise ValueError(f"{where}{key} must be an integer in [{lo}, {hi}], got {value}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}{key} must be a finite number, got {value}")
    elif isinstance(value, str):
        if len(value) > 200:
            raise ValueError(f"{where}{key} is a string of {len(value)} characters; at most 200")
    else:
        raise ValueError(f"{where}{key} must be a number, a string or a bool, got {type(value).__name__}")


def _expect(key: str, value, kind: str, where: str) -> None:
    """Exact types: a bool is not an int, a string is not a number."""
    ok = {
        "int": type(value) is int,
        "number": type(value) in (int, float),
        "bool": type(value) is bool,
        "str": type(value) is str,
    }[kind]
    if not ok:
        article = "an" if kind == "int" else "a"
        raise ValueError(f"{where}{key} must be {article} {kind}, got {value!r} ({type(value).__name__})")


def check_model_settings(hp: Mapping, where: str = "model.") -> None:
    """Types and bounds of a module's settings (a config's ``model`` or a checkpoint's hyper-parameters);
    ``where`` prefixes each key in the message. Raises ValueError naming the first bad key."""
    for key in ("num_channels", "num_levels", "image_size"):
        if key not in hp:
            raise ValueError(f"{where}{key} is missing")
        _expect(key, hp[key], "int", where)
    if hp["num_channels"] not in (1, 3):
        raise ValueError(f"{where}num_channels must be 1 (grey) or 3 (RGB), got {hp['num_channels']}")
    net = hp.get("net")
    if not isinstance(net, Mapping):
        raise ValueError(f"{where}net must be a mapping with arch and the network's settings")
    arch = net.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{where}net.arch: unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}"
        )
    for key, value in hp.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}{key!r}: setting names must be strings")
        if key in NESTED and value is not None:
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}{key} must be a mapping, got {type(value).__name__}")
            for sub, item in value.items():
                if not isinstance(sub, str):
                    raise ValueError(f"{where}{key}.{sub!r}: setting names must be strings")
                _check_scalar(f"{key}.{sub}", item, where)
        else:
            _check_scalar(key, value, where)
    for key in ("hidden", "num_layers", "output_hidden", "num_output_layers", "kernel_size"):
        if key in net:
            _expect(f"net.{key}", net[key], "int", where)
    for key in ("residual", "skip"):
        if key in net:
            _expect(f"net.{key}", net[key], "bool", where)
    for group in ("optimizer", "scheduler", "output"):
        settings = hp.get(group)
        if isinstance(settings, Mapping) and "name" in settings:
            _expect(f"{group}.name", settings["name"], "str", where)
    optimizer = hp.get("optimizer") or {}
    if optimizer and optimizer.get("name") not in OPTIMIZERS:
        raise ValueError(
            f"{where}optimizer.name: unknown optimizer {optimizer.get('name')!r}; "
            f"choose one of {sorted(OPTIMIZERS)}"
        )
    for key, (lo, hi, closed) in FLOAT_BOUNDS.items():
        group, _, name = key.rpartition(".")
        settings = hp.get(group) if group else hp
        if not isinstance(settings, Mapping) or settings.get(name) is None:
            continue
        value = settings[name]
        _expect(key, value, "number", where)
        if not (math.isfinite(value) and (lo <= value if closed else lo < value) and value <= hi):
            low = "[" if closed else "("
            raise ValueError(f"{where}{key} must be a finite number in {low}{lo:g}, {hi:g}], got {value}")
    if "num_classes" in hp:
        _expect("num_classes", hp["num_classes"], "int", where)
    if "conditional" in hp:
        _expect("conditional", hp["conditional"], "bool", where)
    output = hp.get("output")
    if isinstance(output, Mapping) and output.get("name", "categorical") not in DISTRIBUTIONS:
        raise ValueError(
            f"{where}output.name: unknown output {output.get('name')!r}; "
            f"choose one of {sorted(DISTRIBUTIONS)}"
        )
    if (hp.get("scheduler") or {}).get("gamma") is not None:
        _expect("scheduler.gamma", hp["scheduler"]["gamma"], "number", where)


def _meta_module(hp: Mapping) -> AutoregressiveModule:
    """The module these settings build, on the ``meta`` device: shapes only, no memory."""
    with torch.device("meta"):
        return AutoregressiveModule(**hp)


def _size(module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def check_network_size(hp: Mapping, where: str = "model.", module=None) -> None:
    """Refuses settings whose network would have more than MAX_ELEMENTS parameters and buffers."""
    size = _size(module if module is not None else _meta_module(hp))
    if size > MAX_ELEMENTS:
        raise ValueError(
            f"{where}net would have {size:,} parameters, more than the {MAX_ELEMENTS:,} allowed; "
            f"lower net.hidden / net.num_layers"
        )


def check_checkpoint_module(ckpt: dict, path: str = "the checkpoint") -> None:
    """A checkpoint's hyper-parameters (types, bounds, network size) and that its weights fit them, checked
    on the ``meta`` device: nothing is allocated."""
    hp = ckpt["hyper_parameters"]
    where = f"{path}: hyper_parameters."
    try:
        check_model_settings(hp, where)
        meta = _meta_module(hp)
        check_network_size(hp, where, meta)
        expected = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
    except ValueError as err:
        raise CheckpointError(f"{err}; refusing to load it") from None
    except Exception as err:  # noqa: BLE001 - the module refused these settings
        raise CheckpointError(f"{where[:-1]} are not settings this model takes ({_why(err)})") from None
    state = ckpt["state_dict"]
    got = {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}
    if got != expected or len(got) != len(state):
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:3]
        raise CheckpointError(
            f"{path}: its weights do not fit its hyper_parameters (missing {missing}, unexpected {extra}, "
            f"wrong shape {wrong})"
        )


def module_from_checkpoint(ckpt: dict, path: str = "the checkpoint") -> AutoregressiveModule:
    """The module of a checkpoint already read by ``load_checkpoint``, with its weights; its settings are
    checked (:func:`check_checkpoint_module`) before anything is allocated."""
    check_checkpoint_module(ckpt, path)
    module = AutoregressiveModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    return module


# --------------------------------------------------------------------------------------- data configs
def data_module_name(target: str) -> str | None:
    """The conf/data option whose class is ``target`` (a ``module.Class`` path), if it is one of ours."""
    for name, cls in DATA_MODULES.items():
        if target == f"{cls.__module__}.{cls.__qualname__}":
            return name
    return None


def _data_parameters(cls) -> dict[str, tuple[type, bool]]:
    """A data module's constructor parameters: their scalar type (from the annotation, else the default)
    and whether they may be None (``str | None``)."""
    kinds = {}
    for name, param in inspect.signature(cls, eval_str=True).parameters.items():
        annotation, nullable = param.annotation, param.default is None
        args = typing.get_args(annotation)
        if args and type(None) in args:
            nullable = True
            rest = [a for a in args if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else None
        kind = annotation if annotation in (int, float, str, bool) else type(param.default)
        if kind in (int, float, str, bool):
            kinds[name] = (kind, nullable)
    return kinds


def stored_data_config(data_config: Mapping) -> dict | None:
    """What a checkpoint stores of a (trusted, composed) data config: the option's name and its plain
    values; None for a data module that is not one of the project's own."""
    name = data_module_name(str(data_config.get("_target_", "")))
    if name is None:
        return None
    known = _data_parameters(DATA_MODULES[name])
    return {"name": name, **{k: v for k, v in data_config.items() if k in known}}


def data_module_from_checkpoint(data_config, path: str, **overrides):
    """The data module a checkpoint's ``data_config`` names, built from its checked plain values."""
    if not isinstance(data_config, dict):
        raise CheckpointError(f"{path}: its data_config is not a mapping; refusing to use it")
    config = dict(data_config)
    if "name" in config:
        name = config.pop("name")
        if not isinstance(name, str) or name not in DATA_MODULES:
            raise CheckpointError(
                f"{path}: its data_config names data module {name!r}, not one of {sorted(DATA_MODULES)}; "
                f"refusing to use it (pass image=<file.png> instead)"
            )
    elif "_target_" in config:  # written before names were stored
        name = data_module_name(config.pop("_target_")) if isinstance(config["_target_"], str) else None
        if name is None:
            raise CheckpointError(
                f"{path}: its data_config targets {str(data_config['_target_'])[:100]!r}, not one of the "
                f"project's data modules; refusing to use it (pass image=<file.png> instead)"
            )
    else:
        raise CheckpointError(f"{path}: its data_config names no data module; refusing to use it")
    cls = DATA_MODULES[name]
    known = _data_parameters(cls)
    for key, value in config.items():
        if key not in known:
            raise CheckpointError(
                f"{path}: its data_config has {str(key)[:60]!r}, not a setting of data module {name}; "
                f"refusing to use it"
            )
        kind, nullable = known[key]
        fits = type(value) is kind or (kind is float and type(value) is int) or (nullable and value is None)
        if not fits:
            raise CheckpointError(
                f"{path}: its data_config.{key} must be {kind.__name__}, got {type(value).__name__}; "
                f"refusing to use it"
            )
        if kind is int and value is not None and not GENERIC_INT[0] <= value <= GENERIC_INT[1]:
            raise CheckpointError(
                f"{path}: its data_config.{key}={value} is out of range; refusing to use it"
            )
        if kind is float and value is not None and not math.isfinite(value):
            raise CheckpointError(f"{path}: its data_config.{key}={value} is not finite; refusing to use it")
        if kind is str and value is not None and len(value) > 4096:
            raise CheckpointError(f"{path}: its data_config.{key} is too long; refusing to use it")
    for key in overrides:
        if key not in known:
            raise ValueError(f"the checkpoint's dataset ({name}) takes no {key}")
    return cls(**{**config, **overrides})


# ------------------------------------------------------------------------------------------- resuming
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


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Removes the ``.<name>.tmp-<pid>-<id>`` files that an interrupted atomic write (``kill -9``) left in
    ``folder``; a file whose writing process is still running is left alone."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in os.scandir(folder):
        match = re.fullmatch(r"\..+\.tmp-(\d+)-[0-9a-f]+", entry.name)
        if not match or not entry.is_file(follow_symlinks=False) or _running(int(match.group(1))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    if removed:
        log.info(f"removed {len(removed)} unfinished checkpoint write(s) in {folder}")
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def copy_checkpoint(source: str, folder: str) -> str:
    """Copies ``source`` into ``folder`` atomically (a temporary name, then a rename); returns the copy."""
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(source))
    tmp = os.path.join(folder, f".{os.path.basename(source)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def check_data_matches(model: AutoregressiveModule, datamodule, ckpt: dict | None) -> None:
    for key in ("num_channels", "num_levels", "image_size"):
        expected, actual = getattr(model, key), getattr(datamodule, key, None)
        if actual is not None and expected != actual:
            stored = (ckpt or {}).get("data_config")
            trained_on = (stored.get("name") or stored.get("_target_")) if isinstance(stored, dict) else None
            hint = f" (it was trained on data={trained_on}: pick that data config)" if trained_on else ""
            raise ValueError(f"the model has {key}={expected} but the data gives {key}={actual}{hint}")


def best_score(checkpointing) -> float | None:
    """The best monitored value; read back from the best checkpoint where a spawned process found it."""
    if checkpointing is None:
        return None
    if checkpointing.best_model_score is not None:
        return float(checkpointing.best_model_score)
    if checkpointing.best_model_path and os.path.isfile(checkpointing.best_model_path):
        states = load_checkpoint(checkpointing.best_model_path).get("callbacks", {})
        for state in states.values():  # (ModelCheckpoint's, or its subclass's)
            if isinstance(state, dict) and state.get("best_model_score") is not None:
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
