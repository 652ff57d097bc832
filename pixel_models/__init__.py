"""Autoregressive image models after van den Oord et al., *Pixel Recurrent Neural Networks* (2016).

- ``blocks/``: causal masks, the first and output layers, the residual + skip stack, LSTM helpers;
- ``architectures/``: one network per file with its cached sampler, and the registry (``ARCHITECTURES``);
- ``distributions/``: output distributions over the K levels of a sub-pixel (``model.output``);
- ``sampling/``: generation and completion for every architecture, sample grids;
- ``training/``: the LightningModule, likelihoods, callbacks, faults, tracking, checkpoints.
"""

import uuid as _uuid

from omegaconf import OmegaConf as _OmegaConf

# ``${run_id:}`` (conf/hydra/default.yaml, conf/sample.yaml): a short random id, the same everywhere in one
# process, so two runs started in the same second from one folder never share a run directory. Registered
# here, on import of the package, so that every entry point (train.py, sample.py, evaluate.py) has it.
_RUN_ID = _uuid.uuid4().hex[:6]
if not _OmegaConf.has_resolver("run_id"):
    _OmegaConf.register_new_resolver("run_id", lambda: _RUN_ID)
