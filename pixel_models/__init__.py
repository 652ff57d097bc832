"""Autoregressive image models after van den Oord et al., *Pixel Recurrent Neural Networks* (2016).

- ``blocks/``: causal masks, the first and output layers, the residual + skip stack, LSTM helpers;
- ``architectures/``: one network per file with its cached sampler, and the registry (``ARCHITECTURES``);
- ``distributions/``: output distributions over the K levels of a sub-pixel (``model.output``);
- ``sampling/``: generation and completion for every architecture, sample grids;
- ``training/``: the LightningModule, likelihoods, callbacks, faults, tracking, checkpoints.
"""
