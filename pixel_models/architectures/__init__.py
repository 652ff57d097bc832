"""The registry of architectures: the names of ``model.net.arch`` and the network class each builds.

Adding an architecture: one file in this folder (the network, with a docstring naming its paper, and its
cached sampler), one line below, one ``conf/model/<name>.yaml`` holding its ``net``; the contract test
(``tests/test_contract.py``) then checks it and refuses to pass until it has test settings there.
"""

from pixel_models.architectures.diagonal_bilstm import DiagonalBiLSTM
from pixel_models.architectures.gated_pixelcnn import GatedPixelCNN
from pixel_models.architectures.multiscale import MultiScalePixelRNN
from pixel_models.architectures.pixelcnn import PixelCNN
from pixel_models.architectures.pixelcnn_pp import PixelCNNPP
from pixel_models.architectures.row_lstm import RowLSTM

ARCHITECTURES = {
    "pixelcnn": PixelCNN,
    "row_lstm": RowLSTM,
    "diag_bilstm": DiagonalBiLSTM,
    "multiscale": MultiScalePixelRNN,
    "gated_pixelcnn": GatedPixelCNN,
    "pixelcnn_pp": PixelCNNPP,
}


def build_network(arch: str, **kwargs):
    """Build the network named ``arch`` from plain keyword arguments."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)} (model.net.arch)"
        )
    return ARCHITECTURES[arch](**kwargs)
