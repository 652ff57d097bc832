"""A training data order that a checkpoint can resume exactly, even in the middle of an epoch.

A plain ``DataLoader(shuffle=True)`` draws each epoch's order from the global random state, which a
checkpoint does not hold, and Lightning restarts a resumed epoch from its first batch. Here the order of
epoch ``e`` is a fixed function of ``(seed, e)``, split over processes like ``DistributedSampler`` (padded
to equal shares), and the loader's state (epoch, samples already trained on) travels in every checkpoint
through Lightning's stateful-loader interface: a resumed run continues with exactly the batch that comes
next. Validation and test loaders are left as they are.

train.py adds :class:`ResumableTrainOrder`, which wraps the data module's ``train_dataloader``.
"""

import logging
import math

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

log = logging.getLogger(__name__)


class EpochOrder(Sampler[int]):
    """This process's indices for one epoch: a permutation seeded by ``(seed, epoch)`` (or ``0..N-1`` when
    not shuffling), padded by wrapping around to a multiple of ``num_replicas`` and dealt round-robin.

    :meth:`start` fixes the next pass (epoch, number of leading samples to skip); a pass that was not
    started follows ``epoch``.
    """

    def __init__(
        self, num_items: int, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0, epoch: int = 0
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = epoch
        self.num_samples = math.ceil(num_items / num_replicas) if num_items else 0
        self._indices: list[int] | None = None

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.num_replicas
        if order:
            while len(order) < total:
                order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self._indices = self.indices(epoch)[skip:]

    def __iter__(self):
        indices = self._indices if self._indices is not None else self.indices(self.epoch)
        self._indices = None
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader:
    """An iterable over a data module's training batches with a resumable, reproducible order.

    Not a ``DataLoader`` on purpose: Lightning then leaves it alone (no sampler replacement under DDP, which
    :class:`EpochOrder` does itself) and treats it as stateful through ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, loader: DataLoader, seed: int, trainer: L.Trainer):
        self.trainer = trainer
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.drop_last = loader.drop_last
        self.sampler = EpochOrder(
            len(loader.dataset),
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
            num_replicas=trainer.world_size,
            rank=trainer.global_rank,
            epoch=trainer.current_epoch,
        )
        self.loader = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=self.sampler,
            drop_last=loader.drop_last,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            persistent_workers=loader.persistent_workers,
        )
        self._resume: tuple[int, int] | None = None
        self._iter_epoch: int | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # A generator: nothing happens until the first batch is asked for (Lightning also calls iter() just
        # to check that this is iterable). The epoch is the trainer's count of completed epochs, not the
        # number Lightning passes to samplers' set_epoch, which runs one ahead after an end-of-epoch resume.
        epoch, skip = self._resume if self._resume is not None else (self.trainer.current_epoch, 0)
        self._resume = None
        self.sampler.start(epoch, skip)
        self._iter_epoch = epoch
        yield from self.loader

    def state_dict(self) -> dict:
        """Where the next training batch comes from: its epoch and the samples of that epoch already used."""
        epoch = self._iter_epoch if self._iter_epoch is not None else self.sampler.epoch
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if done >= self.trainer.num_training_batches:
            return {"epoch": epoch + 1, "samples": 0, "seed": self.sampler.seed}
        return {"epoch": epoch, "samples": done * self.batch_size, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.sampler.seed) != self.sampler.seed:
            log.warning(
                f"resuming with seed={self.sampler.seed} but the checkpoint was trained with "
                f"seed={state['seed']}: the data order differs from the interrupted run"
            )
        self._resume = (int(state["epoch"]), int(state["samples"]))


class ResumableTrainOrder(L.Callback):
    """Replaces the data module's training loader by a :class:`ResumableLoader` while fitting.

    Loaders it cannot reproduce (iterable datasets, custom samplers or batch samplers) are kept as they are.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._original = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or self._original is not None:
            return
        original = datamodule.train_dataloader
        seed = self.seed

        def train_dataloader():
            loader = original()
            if (
                not isinstance(loader, DataLoader)
                or loader.batch_size is None
                or not isinstance(loader.sampler, (RandomSampler, SequentialSampler))
                or getattr(loader.sampler, "replacement", False)
                or getattr(loader.sampler, "_num_samples", None) is not None
                or not hasattr(loader.dataset, "__len__")
            ):
                log.warning(
                    "the training loader is not a plain DataLoader: its order will not resume exactly"
                )
                return loader
            return ResumableLoader(loader, seed, trainer)

        # what to put back: the instance's own attribute if it had one, else nothing (the class method)
        self._original = (vars(datamodule).get("train_dataloader"), train_dataloader)
        datamodule.train_dataloader = train_dataloader

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._original is None:
            return
        previous, wrapper = self._original
        datamodule = trainer.datamodule
        if datamodule is not None and vars(datamodule).get("train_dataloader") is wrapper:
            if previous is None:
                del datamodule.train_dataloader
            else:
                datamodule.train_dataloader = previous
        self._original = None
