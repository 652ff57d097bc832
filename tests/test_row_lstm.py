import pytest
import torch
from causality import assert_causal, layer_input_gradients
from helpers import output_colour_mask

from pixel_models.architectures import ARCHITECTURES, build_network
from pixel_models.architectures.row_lstm import RowLSTM, RowLSTMLayer


def layer_context(height, width, kernel_size):
    """Pixels one Row LSTM layer reads for output (i, j), itself included (mask B): (H, W, H, W).

    Row i reads columns j - k//2 .. j through the masked input-to-state convolution; each row further
    up adds k//2 columns on both sides through the state-to-state convolution of the row below it.
    """
    half = kernel_size // 2
    rows = torch.arange(height)
    cols = torch.arange(width)
    up = rows[:, None, None, None] - rows[None, None, :, None]  # i - i'
    shift = cols[None, :, None, None] - cols[None, None, None, :]  # j - j'
    return (up >= 0) & (shift <= (up + 1) * half) & (shift >= -up * half)


def first_layer_context(height, width, kernel_size=7):
    """Pixels the 7x7 mask-A first layer reads for pixel (i, j), itself excluded: (H, W, H, W)."""
    half = kernel_size // 2
    rows = torch.arange(height)
    cols = torch.arange(width)
    up = rows[:, None, None, None] - rows[None, None, :, None]
    shift = cols[None, :, None, None] - cols[None, None, None, :]
    above = (up >= 1) & (up <= half) & (shift.abs() <= half)
    left = (up == 0) & (shift >= 1) & (shift <= half)
    return above | left


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_one_layer_sees_exactly_the_triangle_above(kernel_size):
    layer = RowLSTMLayer(hidden=6, num_colors=1, kernel_size=kernel_size)
    height, width = 5, 9
    grads = layer_input_gradients(layer, height, width)
    expected = layer_context(height, width, kernel_size)
    assert torch.equal(grads > 0, expected)
    # The last pixel of the middle column: its own row up to k//2 to the left, the row above k//2
    # further on each side; the right of its own row and the pixels past the edges stay unseen.
    half, j = kernel_size // 2, 4
    assert grads[4, j, 4, j] > 0 and grads[4, j, 4, j - half] > 0
    assert grads[4, j, 4, j + 1] == 0 and grads[4, j, 4, j - half - 1] == 0
    assert grads[4, j, 3, j + half] > 0 and grads[4, j, 3, j - 2 * half] > 0
    assert grads[4, j, 3, j + half + 1] == 0
    assert grads[4, j, 0, :].bool().all()  # four rows up the triangle spans the whole width


def test_one_layer_network_sees_first_layer_composed_with_triangle():
    net = RowLSTM(1, num_levels=4, hidden=12, num_layers=1, output_hidden=12)
    height = width = 5
    grads = assert_causal(net, 1, height, width)[0, :, :, 0]
    first = first_layer_context(height, width)
    lstm = layer_context(height, width, 3)
    # Residual and skip: the first layer's own context plus its context at every pixel the LSTM reads.
    pixels = height * width
    through_lstm = lstm.double().view(pixels, pixels) @ first.double().view(pixels, pixels)
    assert torch.equal(grads > 0, first | (through_lstm.view_as(first) > 0))
    # The top-left pixel is out of reach of the last pixel's first layer, but not through the LSTM.
    assert not first[4, 4, 0, 0] and grads[4, 4, 0, 0] > 0


def reference_row_lstm_layer(layer, x, num_colors):
    """Per-pixel Row LSTM with explicit loops, from the layer's weights and masks rebuilt here."""
    h = layer.hidden
    w_is = layer.input_to_state.weight[:, :, 0, :]  # (4h, 2h, k)
    b_is = layer.input_to_state.bias
    w_ss = layer.state_to_state.weight  # (4h, h, k)
    w_out = layer.output.weight[:, :, 0, 0]  # (2h, h)
    b_out = layer.output.bias
    k = w_is.shape[-1]
    centre = k // 2
    # Gate feature q is feature q % h of its gate, colour group (q % h) % C; input feature f: f % C.
    mask_is = torch.zeros_like(w_is)
    for q in range(4 * h):
        for f in range(2 * h):
            for t in range(k):
                if t < centre or (t == centre and (q % h) % num_colors >= f % num_colors):
                    mask_is[q, f, t] = 1
    w_is = w_is * mask_is
    w_out = w_out * output_colour_mask(w_out, num_colors)

    batch, _, height, width = x.shape
    hid = torch.zeros(batch, h, height, width, dtype=x.dtype)
    cell = torch.zeros(batch, h, height, width, dtype=x.dtype)
    for i in range(height):
        for j in range(width):
            z = b_is.expand(batch, 4 * h).clone()
            for t in range(k):
                jj = j + t - centre
                if 0 <= jj < width:
                    z += x[:, :, i, jj] @ w_is[:, :, t].T
                    if i > 0:
                        z += hid[:, :, i - 1, jj] @ w_ss[:, :, t].T
            gi, gf, go, gg = z.split(h, dim=1)
            c_prev = cell[:, :, i - 1, j] if i > 0 else torch.zeros_like(gi)
            cell[:, :, i, j] = torch.sigmoid(gf) * c_prev + torch.sigmoid(gi) * torch.tanh(gg)
            hid[:, :, i, j] = torch.sigmoid(go) * torch.tanh(cell[:, :, i, j])
    return torch.einsum("of,bfij->boij", w_out, hid) + b_out[:, None, None]


@pytest.mark.parametrize("num_colors, kernel_size", [(1, 3), (3, 3), (3, 5)])
def test_layer_matches_per_pixel_reference(num_colors, kernel_size):
    layer = RowLSTMLayer(hidden=4, num_colors=num_colors, kernel_size=kernel_size).double()
    with torch.no_grad():
        for p in layer.parameters():  # larger weights so gates leave their linear range
            p.mul_(3)
        x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
        expected = reference_row_lstm_layer(layer, x, num_colors)
        assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)


def test_row_lstm_is_registered_and_checks_input():
    assert ARCHITECTURES["row_lstm"] is RowLSTM
    net = build_network("row_lstm", num_channels=3, num_levels=2, hidden=6, num_layers=1, output_hidden=6)
    with pytest.raises(ValueError, match="num_channels"):
        net(torch.rand(2, 1, 8, 8))


def test_even_kernel_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        RowLSTMLayer(hidden=4, num_colors=1, kernel_size=4)
