import pytest
import torch
from causality import allowed_inputs, assert_causal, layer_input_gradients
from helpers import output_colour_mask

from pixel_models.architectures import ARCHITECTURES, build_network
from pixel_models.architectures.diagonal_bilstm import DiagonalBiLSTM, DiagonalBiLSTMLayer, skew, unskew


@pytest.mark.parametrize("n, m", [(1, 1), (1, 4), (4, 1), (3, 4), (4, 2), (5, 5)])
def test_skew_shifts_row_r_right_by_r_and_unskew_inverts_it(n, m):
    x = torch.randn(2, 3, n, m)
    s = skew(x)
    assert s.shape == (2, 3, n, n + m - 1)
    for r in range(n):
        assert torch.equal(s[:, :, r, r : r + m], x[:, :, r])
        assert (s[:, :, r, :r] == 0).all() and (s[:, :, r, r + m :] == 0).all()
    assert torch.equal(unskew(s), x)


def test_skew_keeps_leading_dimensions_and_gradients():
    x = torch.randn(2, 2, 4, 3, 5, requires_grad=True)
    y = unskew(skew(x))
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("height, width", [(5, 5), (3, 6), (6, 3)])
def test_one_layer_sees_every_earlier_pixel_and_itself(height, width):
    layer = DiagonalBiLSTMLayer(hidden=6, num_colors=1)
    grads = layer_input_gradients(layer, height, width, image_channels=1)
    pixel = torch.arange(height * width).view(height, width)
    earlier_or_same = pixel[:, :, None, None] >= pixel[None, None, :, :]
    assert torch.equal(grads > 0, earlier_or_same)


@pytest.mark.parametrize("height, width", [(5, 5), (3, 6)])
def test_one_layer_reads_the_image_above_and_to_the_right_through_the_right_to_left_direction(height, width):
    layer = DiagonalBiLSTMLayer(hidden=6, num_colors=1).double()
    x = torch.randn(4, 12, height, width, dtype=torch.float64)
    image = torch.rand(4, 1, height, width, dtype=torch.float64, requires_grad=True)
    out = layer(x, image)
    rows, cols = torch.arange(height), torch.arange(width)
    for i in range(height):
        for j in range(width):
            (g,) = torch.autograd.grad(out[:, :, i, j].sum(), image, retain_graph=True)
            # The right-to-left state of (i-1, j), moved down a row: rows above, columns j and right.
            expected = (rows[:, None] < i) & (cols[None, :] >= j)
            assert torch.equal(g.abs().sum((0, 1)) > 0, expected), (i, j)


@pytest.mark.parametrize("height, width", [(5, 5), (4, 7), (3, 9)])
def test_one_layer_network_sees_every_earlier_pixel(height, width):
    net = DiagonalBiLSTM(1, num_levels=4, hidden=12, num_layers=1, output_hidden=12)
    grads = assert_causal(net, 1, height, width)[0, :, :, 0]
    # Every earlier pixel and nothing else, at every position: including the end of the row above and
    # the far corners, which the 7x7 first layer alone cannot reach.
    assert torch.equal(grads > 0, allowed_inputs(1, height, width)[0, :, :, 0])


def reference_diagonal_bilstm_layer(layer, x, image, num_colors):
    """Per-pixel Diagonal BiLSTM with explicit loops, from the layer's weights and masks rebuilt here.

    Each direction's LSTM at pixel (i, j) takes the hidden state of the pixel above and of the previous
    pixel in its row (left for left-to-right, right for right-to-left), and the cell of the latter.
    """
    h = layer.hidden
    w_is = layer.input_to_state.weight[:, :, 0, 0]  # (8h, 2h): left-to-right i, f, o, g, then right-to-left
    b_is = layer.input_to_state.bias
    w_ss = layer.state_to_state.weight  # (8h, h, 2): tap 0 the pixel above, tap 1 the previous one
    w_image = layer.image_to_state.weight[:, :, 0, 0]  # (4h, C): right-to-left gates from the image
    w_out = layer.output.weight[:, :, 0, 0]
    b_out = layer.output.bias
    mask_is = torch.zeros_like(w_is)
    for q in range(8 * h):
        for f in range(2 * h):
            mask_is[q, f] = float((q % h) % num_colors >= f % num_colors)
    w_is = w_is * mask_is
    w_out = w_out * output_colour_mask(w_out, num_colors)
    batch, _, height, width = x.shape

    def direction(w, b, u, step, w_img=None):
        hid = torch.zeros(batch, h, height, width, dtype=x.dtype)
        cell = torch.zeros(batch, h, height, width, dtype=x.dtype)
        columns = range(width) if step == 1 else range(width - 1, -1, -1)
        for i in range(height):
            for j in columns:
                z = b + x[:, :, i, j] @ w.T
                if w_img is not None:
                    z = z + image[:, :, i, j] @ w_img.T
                if i > 0:
                    z = z + hid[:, :, i - 1, j] @ u[:, :, 0].T
                c_prev = torch.zeros(batch, h, dtype=x.dtype)
                if 0 <= j - step < width:
                    z = z + hid[:, :, i, j - step] @ u[:, :, 1].T
                    c_prev = cell[:, :, i, j - step]
                gi, gf, go, gg = z.split(h, dim=1)
                cell[:, :, i, j] = torch.sigmoid(gf) * c_prev + torch.sigmoid(gi) * torch.tanh(gg)
                hid[:, :, i, j] = torch.sigmoid(go) * torch.tanh(cell[:, :, i, j])
        return hid

    left = direction(w_is[: 4 * h], b_is[: 4 * h], w_ss[: 4 * h], step=1)
    right = direction(w_is[4 * h :], b_is[4 * h :], w_ss[4 * h :], step=-1, w_img=w_image)
    total = left.clone()
    total[:, :, 1:] += right[:, :, :-1]  # the right-to-left state of the row above
    return torch.einsum("of,bfij->boij", w_out, total) + b_out[:, None, None]


@pytest.mark.parametrize("num_colors, height, width", [(1, 4, 5), (3, 4, 5), (3, 5, 3)])
def test_layer_matches_per_pixel_reference(num_colors, height, width):
    layer = DiagonalBiLSTMLayer(hidden=4, num_colors=num_colors).double()
    with torch.no_grad():
        for p in layer.parameters():  # larger weights so gates leave their linear range
            p.mul_(3)
        x = torch.randn(2, 8, height, width, dtype=torch.float64)
        image = torch.rand(2, num_colors, height, width, dtype=torch.float64)
        expected = reference_diagonal_bilstm_layer(layer, x, image, num_colors)
        assert torch.allclose(layer(x, image), expected, atol=1e-6, rtol=0)


def test_diagonal_bilstm_is_registered_and_checks_input():
    assert ARCHITECTURES["diag_bilstm"] is DiagonalBiLSTM
    net = build_network("diag_bilstm", num_channels=3, num_levels=2, hidden=6, num_layers=1, output_hidden=6)
    with pytest.raises(ValueError, match="num_channels"):
        net(torch.rand(2, 1, 8, 8))
