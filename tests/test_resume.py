"""Resuming from a checkpoint continues exactly: weights, step, optimizer and scheduler state, data order."""

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
