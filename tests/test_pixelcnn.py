import pytest
import torch
from causality import assert_causal, logits_of

from pixel_models.architectures.pixelcnn import PixelCNN


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("train_mode", [True, False])
def test_pixelcnn_is_causal(num_channels, train_mode):
    net = PixelCNN(num_channels, num_levels=4, hidden=12, num_layers=2, output_hidden=12)
    net.train(train_mode)
    grads = assert_causal(net, num_channels)
    # With a 7x7 first layer the last pixel sees at least the pixel to its left and the one above.
    assert grads[0, 4, 4, 0, 4, 3] > 0 and grads[0, 4, 4, 0, 3, 4] > 0


def test_pixelcnn_runs_at_any_size():
    net = PixelCNN(1, num_levels=2, hidden=4, num_layers=1, output_hidden=4)
    assert logits_of(net, torch.rand(2, 1, 7, 11)).shape == (2, 2, 1, 7, 11)


def test_wrong_channel_count_is_a_clear_error():
    net = PixelCNN(3, num_levels=2, hidden=6, num_layers=1, output_hidden=6)
    with pytest.raises(ValueError, match="num_channels"):
        net(torch.rand(2, 1, 8, 8))
