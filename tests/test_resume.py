"""Resuming from a checkpoint continues exactly: weights, step, optimizer and scheduler state, data order."""

import json
import os
import signal

import lightning as L
import pytest
import torch
from helpers import TINY_RUN, compose_train

from pixel_models.training.checkpoint import load_checkpoint
from pixel_models.training.resumable import EpochOrder

TOTAL_STEPS = 10  # 4 batches per epoch: epochs 0 and 1 whole, then half of epoch 2


def make_cfg(out, *overrides):
    return compose_train(
        f"output_dir={out}",
        *TINY_RUN,
        "test=false",
        "data.batch_size=16",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "trainer.max_epochs=-1",
        f"trainer.max_steps={TOTAL_STEPS}",
        # a scheduler that steps per epoch: its state must come back too
        "model.scheduler.name=exponential",
        "+model.scheduler.gamma=0.5",
        *overrides,
    )


class Capture(L.Callback):
    """The final weights, step and learning rate of a run."""

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.adam_steps = [float(s["step"]) for s in trainer.optimizers[0].state_dict()["state"].values()]


class SigtermAt(L.Callback):
    """Sends this process a real SIGTERM when training step ``step`` is done (as a cluster would)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def run(cfg, *callbacks):
    from train import train

    capture = Capture()
    train(cfg, extra_callbacks=[*callbacks, capture])
    return capture


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    return run(make_cfg(tmp_path_factory.mktemp("whole")))


def assert_same_run(resumed, whole):
    assert resumed.step == whole.step == TOTAL_STEPS
    assert resumed.lr == whole.lr and resumed.lr < 1e-3  # the scheduler stepped twice, in both
    assert resumed.adam_steps == whole.adam_steps
    for name, value in whole.weights.items():
        assert torch.equal(resumed.weights[name], value), name


def test_sigterm_mid_epoch_then_resume_gives_the_same_weights(tmp_path, uninterrupted):
    # Step 5 is the second batch of epoch 1: the resumed run must continue with that epoch's third batch.
    with pytest.raises(SystemExit) as stopped:
        run(make_cfg(tmp_path / "first"), SigtermAt(5))
    assert stopped.value.code == 128 + signal.SIGTERM
    interrupted = tmp_path / "first" / "checkpoints" / "interrupted.ckpt"
    ckpt = load_checkpoint(interrupted)
    assert ckpt["global_step"] == 5 and ckpt["epoch"] == 1
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "samples": 16, "seed": 12345}
    ]
    resumed = run(make_cfg(tmp_path / "second", f"ckpt_path={interrupted}"))
    assert_same_run(resumed, uninterrupted)


def test_resume_from_an_end_of_epoch_checkpoint_gives_the_same_weights(tmp_path, uninterrupted):
    # last.ckpt after epoch 0's validation: the next epoch's order must be epoch 1's, not epoch 0's again.
    run(make_cfg(tmp_path / "first", "trainer.max_epochs=1"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 4
    resumed = run(make_cfg(tmp_path / "second", f"ckpt_path={last}"))
    assert_same_run(resumed, uninterrupted)


def test_resume_refuses_a_different_architecture(tmp_path):
    run(make_cfg(tmp_path / "first", "trainer.max_steps=1"))
    with pytest.raises(ValueError, match="trained with model net="):
        run(
            make_cfg(
                tmp_path / "second", "model.net.hidden=4", f"ckpt_path={tmp_path}/first/checkpoints/last.ckpt"
            )
        )


def test_epoch_order_is_a_function_of_seed_and_epoch_split_over_ranks():
    order = EpochOrder(11, shuffle=True, seed=3)
    assert list(order.indices(0)) == list(EpochOrder(11, shuffle=True, seed=3).indices(0))
    assert order.indices(0) != order.indices(1) and sorted(order.indices(1)) == list(range(11))
    # two ranks: 6 each, padded by one repeated image, together covering every image
    shares = [EpochOrder(11, shuffle=True, seed=3, num_replicas=2, rank=r).indices(4) for r in (0, 1)]
    assert [len(s) for s in shares] == [6, 6] and set(shares[0]) | set(shares[1]) == set(range(11))
    order.start(epoch=2, skip=5)
    assert list(order) == order.indices(2)[5:]
    assert list(order) == order.indices(order.epoch)  # a skip applies to one pass only


# ------------------------------------------------------------ interrupted anywhere, resumed: the same run
def whole_run_cfg(out, *overrides):
    """3 epochs of 4 steps, validation over 3 batches, then the test stage: a run with every stage."""
    return compose_train(
        f"output_dir={out}",
        *TINY_RUN,
        "data.batch_size=16",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=3",
        "trainer.limit_test_batches=2",
        "trainer.max_epochs=3",
        "model.scheduler.name=exponential",
        "+model.scheduler.gamma=0.5",
        *overrides,
    )


class SigtermInValidation(L.Callback):
    """A real SIGTERM after validation batch ``batch`` of epoch ``epoch`` (inside training)."""

    def __init__(self, epoch, batch=0):
        self.epoch, self.batch = epoch, batch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.state.fn == "fit" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermInTest(L.Callback):
    def on_test_batch_end(self, trainer, *args):
        os.kill(os.getpid(), signal.SIGTERM)


class SigtermWhileSaving(L.Callback):
    """A real SIGTERM while the checkpoint after epoch ``epoch``'s validation is being written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.current_epoch == self.epoch and trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


def finished(out, *callbacks):
    """Runs train.py to the end; its returned value, metrics.json, final and best weights."""
    capture = Capture()
    from train import train

    returned = train(
        whole_run_cfg(out, *[a for a in callbacks if isinstance(a, str)]),
        extra_callbacks=[*[c for c in callbacks if not isinstance(c, str)], capture],
    )
    metrics = json.loads((out / "metrics.json").read_text())
    best = load_checkpoint(metrics["checkpoint"])
    # checkpoints are compared by name: the resumed run has its own folder
    for key in [k for k in metrics if k.endswith("checkpoint")]:
        metrics[key] = metrics[key] and os.path.basename(metrics[key])
    return returned, metrics, best, capture


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    torch.set_num_threads(1)
    return finished(tmp_path_factory.mktemp("whole_run"))


@pytest.mark.parametrize(
    "interruption",
    [
        pytest.param(lambda: SigtermAt(5), id="training step"),
        pytest.param(lambda: SigtermInValidation(epoch=1), id="validation"),
        pytest.param(lambda: SigtermInValidation(epoch=2, batch=1), id="last validation"),
        pytest.param(lambda: SigtermWhileSaving(epoch=1), id="checkpoint write", marks=pytest.mark.slow),
        pytest.param(lambda: SigtermInTest(), id="test stage"),
    ],
)
def test_interrupted_anywhere_then_resumed_ends_as_the_uninterrupted_run(tmp_path, whole_run, interruption):
    from train import train

    with pytest.raises(SystemExit) as stopped:
        train(whole_run_cfg(tmp_path / "first"), extra_callbacks=[interruption()])
    assert stopped.value.code == 128 + signal.SIGTERM
    checkpoints = tmp_path / "first" / "checkpoints"
    resume_from = checkpoints / "interrupted.ckpt"
    if not resume_from.exists():  # stopped after training: the last checkpoint holds everything
        resume_from = checkpoints / "last.ckpt"
    returned, metrics, best, capture = finished(tmp_path / "second", f"ckpt_path={resume_from}")

    whole_returned, whole_metrics, whole_best, whole_capture = whole_run
    assert returned == whole_returned
    assert metrics == whole_metrics  # every metric, the step count, and so nan nowhere
    assert best["epoch"] == whole_best["epoch"]
    for name, value in whole_best["state_dict"].items():
        assert torch.equal(best["state_dict"][name], value), name
    if hasattr(capture, "weights"):  # (a run resumed after its last epoch trains no more)
        for name, value in whole_capture.weights.items():
            assert torch.equal(capture.weights[name], value), name


def test_a_run_resumed_in_a_new_folder_keeps_the_best_checkpoint_of_before(tmp_path):
    # lr=1 makes epoch 1 worse than epoch 0: the resumed run must not call epoch 1 the best (Lightning
    # forgets the best score when the checkpoint folder changes).
    settings = ("model.optimizer.lr=1.0", "model.scheduler.name=none", "trainer.max_epochs=2", "test=false")
    whole_returned, whole_metrics, whole_best, _ = finished(tmp_path / "whole", *settings)
    assert whole_best["epoch"] == 0, "the setup no longer makes epoch 1 worse than epoch 0"
    from train import train

    with pytest.raises(SystemExit):
        train(whole_run_cfg(tmp_path / "first", *settings), extra_callbacks=[SigtermAt(5)])
    first_best = tmp_path / "first" / "checkpoints" / "best_epoch000.ckpt"
    before = first_best.read_bytes()
    interrupted = tmp_path / "first" / "checkpoints" / "interrupted.ckpt"
    returned, metrics, best, _ = finished(tmp_path / "second", *settings, f"ckpt_path={interrupted}")
    assert returned == whole_returned and metrics == whole_metrics and best["epoch"] == 0
    # the resumed run's folder holds its best checkpoint; the first run's is untouched
    assert (tmp_path / "second" / "checkpoints" / "best_epoch000.ckpt").read_bytes() == before
    assert first_best.read_bytes() == before


class LearningRates(L.Callback):
    """The learning rate and weight decay each training step ran with."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.seen.append((trainer.global_step, group["lr"], group["weight_decay"]))


def test_changed_optimizer_and_schedule_settings_apply_from_the_first_resumed_step(tmp_path, caplog):
    run(make_cfg(tmp_path / "first", "trainer.max_epochs=1", "trainer.max_steps=-1"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"  # after epoch 0: lr 1e-3 * 0.5
    rates = LearningRates()
    with caplog.at_level("WARNING"):
        run(
            make_cfg(
                tmp_path / "second",
                f"ckpt_path={last}",
                "trainer.max_epochs=3",
                "trainer.max_steps=-1",
                "model.optimizer.lr=0.01",
                "model.optimizer.weight_decay=0.1",
                "model.scheduler.gamma=0.25",
            ),
            rates,
        )
    # epoch 1 at the new rate times the schedule's factor so far (0.5); epoch 2 with the new gamma
    assert [step for step, *_ in rates.seen] == list(range(4, 12))
    for step, lr, weight_decay in rates.seen:
        assert lr == pytest.approx(0.01 * 0.5 * (0.25 if step >= 8 else 1.0)) and weight_decay == 0.1
    assert "model.optimizer.lr changed from 0.001 to 0.01, from step 4" in caplog.text
    assert "model.scheduler.gamma changed from 0.5 to 0.25" in caplog.text
    # what the new checkpoint records is what ran
    ckpt = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.ckpt")
    assert ckpt["hyper_parameters"]["optimizer"]["lr"] == 0.01
    assert ckpt["hyper_parameters"]["scheduler"]["gamma"] == 0.25
    assert ckpt["lr_schedulers"][0]["gamma"] == 0.25 and ckpt["lr_schedulers"][0]["base_lrs"] == [0.01]
    assert {c["setting"]: (c["old"], c["new"], c["step"]) for c in ckpt["setting_changes"]} == {
        "optimizer.lr": (0.001, 0.01, 4),
        "optimizer.weight_decay": (0.0, 0.1, 4),
        "scheduler.gamma": (0.5, 0.25, 4),
    }


def test_a_resumed_run_removes_the_temporary_files_a_killed_write_left(tmp_path):
    run(make_cfg(tmp_path / "first", "trainer.max_steps=2"))
    checkpoints = tmp_path / "first" / "checkpoints"
    dead_pid = 4_000_000  # above Linux's pid_max: no process has it
    stale = checkpoints / f".last.ckpt.tmp-{dead_pid}-0123abcd"
    stale.write_bytes(b"PK half a checkpoint")
    live = checkpoints / f".best.ckpt.tmp-{os.getpid()}-0123abcd"  # a write still in progress: kept
    live.write_bytes(b"PK")
    run(make_cfg(tmp_path / "second", "trainer.max_steps=3", f"ckpt_path={checkpoints / 'last.ckpt'}"))
    assert not stale.exists() and live.exists()
