"""Surviving faults: atomic checkpoint files, a checkpoint on SIGTERM / Ctrl-C, a stop on a non-finite loss.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file beside the target and renames it
  into place, so a crash mid-write never leaves a truncated ``last.ckpt``; it also refuses to write weights
  that hold NaN or infinity, so a diverged run never overwrites the last good checkpoint.
- :class:`FaultHandling` saves ``<checkpoints>/interrupted.ckpt`` when training is stopped by SIGTERM (a
  cluster's preemption or time limit) or a first Ctrl-C, at the end of the step in progress (a stop
  requested during validation waits for the validation, and its checkpoints, to finish), and stops the run
  with a clear message, naming the step, when the training loss is NaN or infinite.
- :class:`InjectNonFinite` is a test hook that makes the weights NaN at a given step.
"""

import logging
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pixel_models.training.checkpoint import with_digest

log = logging.getLogger(__name__)

INTERRUPTED_NAME = "interrupted.ckpt"


class NonFiniteError(RuntimeError):
    """A training loss or a weight is NaN or infinite."""


def _non_finite_entries(state_dict: dict) -> list[str]:
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.tmp-*`` in the target's folder, fsync, then ``os.replace``.

    A failure at any point (a full disk, a kill, an exception while serialising) leaves the previous file
    at ``path`` untouched and removes the temporary one (a ``kill -9`` leaves it: a resumed run removes
    it). Remote (``scheme://``) paths fall back to Lightning's own writer. Every checkpoint gets its format
    version and digest (``checkpoint.with_digest``), checked when it is read.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        bad = _non_finite_entries(weights) if isinstance(weights, dict) else []
        if bad:
            raise NonFiniteError(
                f"refusing to write {path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold NaN or "
                f"infinite values (the training diverged); the file already there, if any, is kept"
            )
        checkpoint = with_digest(checkpoint)
        path = os.fspath(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "xb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Makes the rename itself durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FaultHandling(L.Callback):
    """Checkpoint on SIGTERM / first Ctrl-C; stop on a non-finite loss. train.py always adds it.

    SIGTERM is Lightning's own graceful path: the trainer finishes the step in progress and raises
    ``SIGTERMException``. A first Ctrl-C is turned into the same request (a second one aborts at once,
    saving nothing), and so is SIGUSR2 under submitit (SLURM's warning before the time limit); the saved
    state is always between two optimizer steps and resumes exactly. A request that comes during a
    validation inside training is held until that validation (and the checkpoints it triggers) is done, so
    the interrupted run never loses a validation result.
    After such a stop, ``interrupted_path`` names the checkpoint and ``signal_name`` the signal.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str = INTERRUPTED_NAME):
        self.dirpath = dirpath
        self.filename = filename
        self.interrupted_path: str | None = None
        self.signal_name: str | None = None
        self._batch_idx = 0
        self._previous_handlers: dict = {}
        self._validating = False
        self._held: int | None = None

    # -- where checkpoints go: next to ModelCheckpoint's, else <default_root_dir>/checkpoints
    def _checkpoint_dir(self, trainer: L.Trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        checkpointing = trainer.checkpoint_callback
        if checkpointing is not None and getattr(checkpointing, "dirpath", None):
            return os.fspath(checkpointing.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")

    # -- Ctrl-C (and submitit's early warning): ask Lightning to stop after this step, as for SIGTERM
    def _stop_signals(self) -> list[signal.Signals]:
        signals = [signal.SIGINT]
        # Under submitit (hydra/launcher=submitit_slurm), SLURM sends SIGUSR2 signal_delay_s before the time
        # limit; submitit's own handler would end the job there and then, without a checkpoint.
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and hasattr(signal, "SIGUSR2"):
            signals.append(signal.SIGUSR2)
        return signals

    def on_train_start(self, trainer, pl_module) -> None:
        self.interrupted_path = self.signal_name = None
        self._validating = False
        self._held: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning's own SIGTERM handler (installed when fit started) still does the stopping; this one only
        # holds a request that comes during validation until the validation is done.
        for signum in (signal.SIGTERM, *self._stop_signals()):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, lambda signum, frame: self._request_stop(trainer, signum))

    def _request_stop(self, trainer, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C aborts at once
        if self._validating:
            # Stopping inside a validation would lose its result: the resumed run would never redo it, and
            # the best checkpoint and metrics would come from the epoch before. It finishes first.
            self._held = signum
            log.warning(f"{self.signal_name}: finishing the validation in progress, then saving a checkpoint")
            return
        self._stop(trainer, signum)

    def _stop(self, trainer, signum: int) -> None:
        previous = self._previous_handlers.get(signum)
        if signum == signal.SIGTERM and callable(previous):
            previous(signum, None)  # Lightning's: stops the launcher's processes, tells the other ranks
        # Lightning checks this flag after every step (and broadcasts it to all processes).
        trainer._signal_connector.received_sigterm = True
        if signum == signal.SIGINT:
            log.warning(
                "Ctrl-C: finishing the current step, then saving a checkpoint "
                "(press Ctrl-C again to stop at once without saving)"
            )
        else:
            log.warning(f"{self.signal_name}: finishing the current step, then saving a checkpoint")

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validating = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_end(self, trainer, pl_module) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last): the flag set here
        # stops the run only after this validation's checkpoints are written.
        self._validating = False
        held, self._held = self._held, None
        if held is not None:
            self._stop(trainer, held)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()
        # Spawned DDP workers (ddp_spawn) must leave the process group before they exit, or they may abort.
        launcher = trainer.strategy.launcher
        if (
            launcher is not None
            and type(launcher).__name__ == "_MultiProcessingLauncher"
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            torch.distributed.destroy_process_group()

    # -- non-finite loss: stop before the backward pass and the optimizer step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        checkpointing = trainer.checkpoint_callback
        last_good = (checkpointing.last_model_path or checkpointing.best_model_path) if checkpointing else ""
        kept = (
            f"the last good checkpoint is kept: {last_good}"
            if last_good
            else "no checkpoint had been written yet"
        )
        raise NonFiniteError(
            f"the training loss is {float(loss.detach().float().mean())} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self._batch_idx}): training stopped and nothing of this "
            f"step is saved; {kept}. Lower model.optimizer.lr or set trainer.gradient_clip_val, then resume "
            f"with ckpt_path=<that checkpoint>."
        )

    # -- SIGTERM / Ctrl-C: write the checkpoint from the state between two steps
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        self.signal_name = self.signal_name or "SIGTERM"
        path = str(Path(self._checkpoint_dir(trainer)) / self.filename)
        # No barriers here (unlike trainer.save_checkpoint): every process dumps, the first one writes.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if trainer.is_global_zero:
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            log.warning(f"{self.signal_name}: saved the state after step {trainer.global_step} to {path}")
        self.interrupted_path = path


class InjectNonFinite(L.Callback):
    """Test hook: turns one weight into NaN when step ``step`` starts, as a diverging run would.

    ``python train.py +callbacks.nan._target_=pixel_models.training.faults.InjectNonFinite \\
    +callbacks.nan.step=3``
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")
