import pytest
from causality import assert_causal

from pixel_models.architectures.pixelcnn import PixelCNN


@pytest.mark.parametrize("num_channels", [1, 3])
def test_pixelcnn_first_layer_reaches_left_and_above(num_channels):
    """(Causality itself, any size and sampling: tests/test_contract.py, for every architecture.)"""
    net = PixelCNN(num_channels, num_levels=4, hidden=12, num_layers=2, output_hidden=12)
    grads = assert_causal(net, num_channels)
    # With a 7x7 first layer the last pixel sees at least the pixel to its left and the one above.
    assert grads[0, 4, 4, 0, 4, 3] > 0 and grads[0, 4, 4, 0, 3, 4] > 0
