"""What a resumed run needs beyond Lightning's own restore, so it ends exactly as the uninterrupted run.

:class:`ResumeState` (train.py always adds it):

- stores the metrics logged so far (``trainer.callback_metrics``) in every checkpoint and puts them back
  when a run resumes, so a run resumed after its last validation (e.g. stopped during the test stage)
  still reports every metric of the run;
- carries the best checkpoint across run directories: Lightning's ``ModelCheckpoint`` forgets the best
  score when the resumed run writes to a new folder (it would then call the next epoch the best whatever
  its score); the best file is copied into the new folder and its score restored;
- applies optimizer and scheduler settings given on resume (``model.optimizer.lr=...``) from the first
  resumed step, instead of the restored ones, logs each change and records them in the checkpoint
  (``setting_changes``), so the recorded hyper-parameters are what ran;
- carries the epoch-level training metrics (``train/nll_epoch``) of an epoch interrupted in the middle:
  Lightning restarts their running sums from zero, so that epoch's mean would cover only the steps after
  the resume;
- removes the temporary files that a ``kill -9`` during a checkpoint write left in the resumed run's folder.
"""

import logging
import os

import lightning as L
import torch

from pixel_models.training.checkpoint import (
    CheckpointError,
    check_checkpoint_module,
    copy_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
)

log = logging.getLogger("train")

# Scheduler state entries that are progress, not settings.
SCHEDULER_PROGRESS = {
    "last_epoch",
    "_step_count",
    "_last_lr",
    "base_lrs",
    "_get_lr_called_within_step",
    "_is_initial",
    "verbose",
}


class ResumeState(L.Callback):
    def __init__(self):
        self._metrics: dict[str, float] = {}
        self._best: dict | None = None
        self._changes: list[dict] = []
        self._fresh: tuple[list, list] | None = None
        self._epoch_sums: dict | None = None

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["callback_metrics"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
        }
        checkpoint["setting_changes"] = list(self._changes)
        epoch_loop = trainer.fit_loop.epoch_loop
        done = epoch_loop.batch_progress.current.completed
        if trainer.training and 0 < done < trainer.num_training_batches:
            # Lightning's own running sums of the on_epoch metrics (a _ResultMetric per logged key).
            sums = {
                key: {"value": m.value.detach().clone(), "count": m.cumulated_batch_size.detach().clone()}
                for key, m in epoch_loop._results.items()
                if m.meta.on_epoch and m.is_tensor and hasattr(m, "cumulated_batch_size")
            }
            checkpoint["epoch_sums"] = {"epoch": trainer.current_epoch, "sums": sums}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        metrics = checkpoint.get("callback_metrics")
        self._metrics = dict(metrics) if isinstance(metrics, dict) else {}
        changes = checkpoint.get("setting_changes")
        self._changes = list(changes) if isinstance(changes, list) else []
        checkpointing = trainer.checkpoint_callback
        states = checkpoint.get("callbacks") or {}
        self._best = states.get(checkpointing.state_key) if checkpointing is not None else None
        sums = checkpoint.get("epoch_sums")
        self._epoch_sums = sums if isinstance(sums, dict) else None

    # ------------------------------------------------------------------------------------ fit: restore
    def on_fit_start(self, trainer, pl_module) -> None:
        # Runs after the module and callbacks are restored, before the optimizer state is: the optimizers
        # here are the ones this run's config built.
        self._fresh = (
            [
                [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                for o in trainer.optimizers
            ],
            [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        )
        if not trainer.ckpt_path:
            return
        for name, value in self._metrics.items():
            trainer.callback_metrics.setdefault(name, torch.tensor(value))
        if trainer.is_global_zero:
            remove_stale_temporaries(os.path.dirname(os.path.abspath(trainer.ckpt_path)))
        self._check_best(trainer)
        self._carry_best(trainer)
        checkpointing = trainer.checkpoint_callback
        if checkpointing is not None and not getattr(checkpointing, "_last_checkpoint_saved", None):
            # As in the uninterrupted run, a checkpoint was saved before: without this, ModelCheckpoint
            # writes last.ckpt again at the end of training (its on_train_end), which that run did not.
            checkpointing._last_checkpoint_saved = (
                checkpointing.last_model_path or checkpointing.best_model_path
            )

    def _check_best(self, trainer) -> None:
        """The best and last checkpoints a resumed state names are read later (test stage, final samples,
        the report): they are untrusted files like any other, checked now."""
        state = self._best or {}
        checkpointing = trainer.checkpoint_callback
        named = {
            getattr(checkpointing, "best_model_path", "") or state.get("best_model_path"),
            state.get("last_model_path"),
        } - {"", None}
        for path in named:
            if not isinstance(path, str):
                raise CheckpointError(
                    f"{trainer.ckpt_path}: it names a checkpoint that is not a path; refusing it"
                )
            if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(trainer.ckpt_path):
                try:
                    check_checkpoint_module(load_checkpoint(path), path)
                except CheckpointError as err:
                    raise CheckpointError(
                        f"the best checkpoint that {trainer.ckpt_path} names is refused: {err}"
                    ) from None

    def _carry_best(self, trainer) -> None:
        """Into a new folder: copies of the best and the last checkpoint so far, and the best score."""
        checkpointing, state = trainer.checkpoint_callback, self._best
        if checkpointing is None or not state or checkpointing.best_model_score is not None:
            return  # nothing to carry, or the same folder: Lightning restored it all
        score, best, last = (state.get(k) for k in ("best_model_score", "best_model_path", "last_model_path"))
        if best and not os.path.isfile(best):
            log.warning(f"the best checkpoint so far ({best}) is not there: the best is tracked from scratch")
            checkpointing.best_model_path = best = ""
        copies = {}
        for path in {best, last} - {"", None}:
            if isinstance(path, str) and os.path.isfile(path):
                copies[path] = os.path.join(checkpointing.dirpath, os.path.basename(path))
                if trainer.is_global_zero:
                    copy_checkpoint(path, checkpointing.dirpath)
        trainer.strategy.barrier("carry_best")
        if last in copies:
            checkpointing.last_model_path = copies[last]
        if score is None or best not in copies:
            return
        copy, score = copies[best], torch.as_tensor(score)
        checkpointing.best_model_path = checkpointing.kth_best_model_path = copy
        checkpointing.best_model_score = checkpointing.kth_value = score
        checkpointing.best_k_models = {copy: score}

    # ----------------------------------------------------------------- fit: settings changed on resume
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.ckpt_path or self._fresh is None:
            return
        fresh_groups, fresh_schedulers = self._fresh
        step = trainer.global_step
        for config, fresh in zip(trainer.lr_scheduler_configs, fresh_schedulers, strict=True):
            scheduler = config.scheduler
            for key, value in fresh.items():
                if key not in SCHEDULER_PROGRESS and getattr(scheduler, key, value) != value:
                    self._change(f"scheduler.{key}", getattr(scheduler, key), value, step)
                    setattr(scheduler, key, value)
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer, groups in zip(trainer.optimizers, fresh_groups, strict=True):
            scheduler = schedulers.get(id(optimizer))
            for i, (group, fresh) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
                for key, value in fresh.items():
                    if key in ("initial_lr",) or group.get(key) == value:
                        continue
                    if key == "lr":
                        old_base = scheduler.base_lrs[i] if scheduler is not None else group["lr"]
                        new_base = fresh.get("initial_lr", value)
                        if old_base == new_base:
                            continue  # only the schedule's progress differs
                        self._change("optimizer.lr", old_base, new_base, step)
                        group["lr"] = (
                            group["lr"] * new_base / old_base
                        )  # the schedule's factor so far is kept
                        group["initial_lr"] = new_base
                        if scheduler is not None:
                            scheduler.base_lrs[i] = new_base
                            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
                    else:
                        self._change(f"optimizer.{key}", group.get(key), value, step)
                        group[key] = value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The first step after a resume in the middle of an epoch has just created fresh sums: add the
        # sums of the steps before the interruption.
        saved, self._epoch_sums = self._epoch_sums, None
        if not saved or saved.get("epoch") != trainer.current_epoch:
            return
        results = trainer.fit_loop.epoch_loop._results
        for key, sums in saved["sums"].items():
            metric = results.get(key)
            if metric is not None and hasattr(metric, "cumulated_batch_size"):
                metric.value += sums["value"].to(metric.value.device)
                metric.cumulated_batch_size += sums["count"].to(metric.cumulated_batch_size.device)

    def _change(self, key: str, old, new, step: int) -> None:
        if not any(c["setting"] == key and c["step"] == step for c in self._changes):
            self._changes.append({"setting": key, "old": _plain(old), "new": _plain(new), "step": step})
            log.warning(f"resuming with model.{key} changed from {old} to {new}, from step {step} on")


def _plain(value):
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value if isinstance(value, bool | int | float | str) or value is None else repr(value)
