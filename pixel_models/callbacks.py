"""Lightning callbacks used by train.py."""

import lightning as L
from omegaconf import DictConfig, OmegaConf


class StoreDataConfig(L.Callback):
    """Writes the data module's config (plain values) into every checkpoint as ``data_config``.

    sample.py uses it to load images of the same dataset for completion, without pickled objects.
    """

    def __init__(self, data_config: DictConfig | dict):
        if isinstance(data_config, DictConfig):
            data_config = OmegaConf.to_container(data_config, resolve=True)
        self.data_config = data_config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["data_config"] = self.data_config
