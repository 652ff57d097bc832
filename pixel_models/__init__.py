"""Autoregressive image models after van den Oord et al., *Pixel Recurrent Neural Networks* (2016)."""

from pixel_models.diagonal_bilstm import DiagonalBiLSTM
from pixel_models.pixelcnn import PixelCNN
from pixel_models.row_lstm import RowLSTM

# Architecture names as they appear in `conf/model/*.yaml` (`net.arch`).
NETWORKS = {
    "pixelcnn": PixelCNN,
    "row_lstm": RowLSTM,
    "diag_bilstm": DiagonalBiLSTM,
}


def build_network(arch: str, **kwargs):
    """Build the network named ``arch`` from plain keyword arguments."""
    if arch not in NETWORKS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(NETWORKS)} (model.net.arch)")
    return NETWORKS[arch](**kwargs)
