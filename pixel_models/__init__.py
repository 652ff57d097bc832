"""Autoregressive image models after van den Oord et al., *Pixel Recurrent Neural Networks* (2016)."""

from pixel_models.pixelcnn import PixelCNN

# Architecture names as they appear in `conf/model/*.yaml` (`net.arch`).
NETWORKS = {
    "pixelcnn": PixelCNN,
}


def build_network(arch: str, **kwargs):
    """Build the network named ``arch`` from plain keyword arguments."""
    if arch not in NETWORKS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(NETWORKS)} (model.net.arch)")
    return NETWORKS[arch](**kwargs)
