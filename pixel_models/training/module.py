"""The LightningModule that trains any network of ``pixel_models`` by negative log-likelihood.

It takes plain values only (numbers, strings, dicts), builds the network inside, and so its
checkpoints load with ``torch.load(weights_only=True)``. Batches are dicts: ``levels``, integer pixel
levels (B, C, H, W) in {0..K-1}; ``index``, each image's index in its split, which lets validation and
test sum the NLL of every image exactly once (see ``likelihood.SplitNLL``); optionally ``label``.

The output distribution (``output``, see ``pixel_models.distributions``) gives the NLL; ``forward``
returns the (B, K, C, H, W) logits of the K levels of every sub-pixel whatever the distribution.
``conditional=True`` builds a class-conditional network over the data's ``num_classes`` (batches must
then carry ``label``); ``label_dropout`` replaces a training image's label by "no label" with that
probability, so the same model also samples unconditionally.

Logged: ``train/nll``, ``val/nll`` and ``test/nll`` in nats per image, ``val/bpd`` and ``test/bpd``
in bits per sub-pixel. The exact (float64) result of each validation during training, with the epoch and
step it was computed at, is kept in ``split_results["val"]`` and written into every checkpoint as
``checkpoint["split_results"]``, so the best checkpoint's exact NLL can be read back from its file
(``checkpoint.stored_val_result``). For data with classes also ``val/nll_class_<k>`` and
``test/nll_class_<k>``, the exact NLL over the images of class k (kept, and stored, as
``split_results[stage]["nll_per_class"]``: {"k": nats per image}).
"""

import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from pixel_models.architectures import build_network
from pixel_models.training.likelihood import SplitNLL, bits_per_dim

OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class AutoregressiveModule(L.LightningModule):
    def __init__(
        self,
        net: dict,
        num_channels: int,
        num_levels: int,
        image_size: int,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        output: dict | None = None,
        conditional: bool = False,
        num_classes: int = 0,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        net, optimizer, scheduler = _plain(net), _plain(optimizer), _plain(scheduler)
        output = _plain(output) or {"name": "categorical"}
        if conditional and num_classes < 1:
            raise ValueError(
                "model.conditional=true needs data with classes, and this data has none (num_classes=0; "
                "binarized MNIST's files hold no labels): pick data with labels or set "
                "model.conditional=false"
            )
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"model.label_dropout={label_dropout} must be in [0, 1)")
        optimizer = optimizer or {"name": "adam", "lr": 1e-3}
        scheduler = scheduler or {"name": "none"}
        if optimizer.get("name") not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer.get('name')!r}; choose one of {sorted(OPTIMIZERS)} "
                f"(model.optimizer.name)"
            )
        if scheduler.get("name") not in ("none", "cosine", "exponential"):
            raise ValueError(
                f"unknown scheduler {scheduler.get('name')!r}; choose none, cosine or exponential "
                f"(model.scheduler.name)"
            )
        self.save_hyperparameters(
            {
                "net": net,
                "num_channels": num_channels,
                "num_levels": num_levels,
                "image_size": image_size,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "output": output,
                "conditional": conditional,
                "num_classes": num_classes,
                "label_dropout": label_dropout,
            }
        )
        net_kwargs = {k: v for k, v in net.items() if k != "arch"}
        self.net = build_network(
            net["arch"],
            num_channels=num_channels,
            num_levels=num_levels,
            output=output,
            num_classes=num_classes if conditional else 0,
            **net_kwargs,
        )
        if callable(getattr(self.net, "check_image_size", None)):  # sizes a network cannot take
            self.net.check_image_size(image_size)
        self.distribution = self.net.distribution
        self.conditional = conditional
        self.num_classes = num_classes if conditional else 0
        self.label_dropout = label_dropout
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.image_size = image_size
        self._split_nll: SplitNLL | None = None
        # The last validation / test result per stage, in float64 (logged metrics are float32):
        # {"val": {"nll": nats per image, "bpd": bits per sub-pixel, "num_images": int}, ...}; while
        # fitting also "epoch" (0-based, as in checkpoint names) and "global_step" of that validation.
        self.split_results: dict[str, dict[str, float]] = {}

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Float images (B, C, H, W) in [0, 1] (and, conditional, classes (B,) or None) -> logits
        (B, K, C, H, W) over the K levels of every sub-pixel."""
        return self.distribution.log_probs(self.net(x, label), x)

    def to_input(self, levels: torch.Tensor) -> torch.Tensor:
        return levels.float() / (self.num_levels - 1)

    def batch_label(self, batch: dict, training: bool = False) -> torch.Tensor | None:
        """The batch's labels for a conditional model (with label dropout in training), else None."""
        if not self.conditional:
            return None
        label = batch.get("label")
        if label is None:
            raise ValueError("a conditional model (model.conditional=true) needs batches with a label")
        if training and self.label_dropout > 0:
            dropped = torch.rand(len(label), device=label.device) < self.label_dropout
            label = torch.where(dropped, torch.full_like(label, self.num_classes), label)
        return label

    def nll(self, levels: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """NLL in nats of each image of a batch of integer levels (float32)."""
        if levels.shape[1] != self.num_channels or tuple(levels.shape[2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"the model expects images of shape ({self.num_channels}, {self.image_size}, "
                f"{self.image_size}), the data gives {tuple(levels.shape[1:])}; set model "
                f"num_channels/image_size from the data config"
            )
        return self.distribution.nll(self.net(self.to_input(levels), label), levels)

    def training_step(self, batch, batch_idx):
        levels = batch["levels"]
        loss = self.nll(levels, self.batch_label(batch, training=True)).mean()
        self.log("train/nll", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(levels))
        return loss

    # Validation and test: per-image sums indexed by dataset position, reduced over processes at the end.
    def _start_split(self, dataloaders) -> None:
        loader = dataloaders[0] if isinstance(dataloaders, list) else dataloaders
        self._split_nll = SplitNLL(len(loader.dataset), device=self.device)

    def _eval_step(self, batch) -> None:
        levels, index = batch["levels"], batch["index"]
        label = self.batch_label(batch)
        # Data with classes: the NLL per class too (for a conditional model, -log p(x | its class)).
        self._split_nll.update(self.nll(levels, label), index, batch.get("label"))

    def _end_split(self, stage: str) -> None:
        split = self._split_nll
        split.all_reduce(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
        if split.num_seen == 0:
            return
        nats = split.mean()
        dims = self.num_channels * self.image_size**2
        bpd = bits_per_dim(nats, dims)
        result = {"nll": nats, "bpd": bpd, "num_images": split.num_seen}
        trainer = self.trainer
        if trainer.state.fn == "fit":
            # a sanity check sees a few batches only: it is no result of these weights
            if trainer.sanity_checking:
                self._split_nll = None
                return
            result.update(epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.split_results[stage] = result
        # Values are already reduced over processes: log them as they are on every rank.
        self.log(f"{stage}/nll", nats, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/bpd", bpd, sync_dist=False)
        self.log(f"{stage}/num_images", float(split.num_seen), sync_dist=False)
        per_class = split.per_class_mean()
        if per_class:
            self.split_results[stage]["nll_per_class"] = {str(k): nll for k, (nll, _) in per_class.items()}
            for k, (nll, _) in per_class.items():
                self.log(f"{stage}/nll_class_{k}", nll, sync_dist=False)
        self._split_nll = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain numbers only (weights_only loading). The step says which weights a result belongs to: a
        # checkpoint written between validations carries an older result, with the older step.
        checkpoint["split_results"] = {k: dict(v) for k, v in self.split_results.items() if k == "val"}

    def on_validation_epoch_start(self):
        self._start_split(self.trainer.val_dataloaders)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._end_split("val")

    def on_test_epoch_start(self):
        self._start_split(self.trainer.test_dataloaders)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._end_split("test")

    def configure_optimizers(self):
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = OPTIMIZERS[opt_cfg.pop("name")](self.parameters(), **opt_cfg)
        sched_cfg = dict(self.hparams.scheduler)
        name = sched_cfg.pop("name")
        if name == "none":
            return optimizer
        if name == "cosine":
            steps = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, math.ceil(steps)))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=sched_cfg.get("gamma", 0.99))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
