"""The fast layer implementations against frozen copies of the plain ones they replaced.

The references below are the straightforward versions (autograd through a Python loop over rows or
diagonals, full masked kernels), written independently of the code under test and kept small. Outputs
and every gradient (input, image, each parameter) must agree within 1e-6 in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from pixel_models.architectures import build_network
from pixel_models.architectures.diagonal_bilstm import DiagonalBiLSTMLayer
from pixel_models.architectures.pixelcnn import ResidualBlock
from pixel_models.architectures.row_lstm import RowLSTMLayer
from pixel_models.blocks import recurrence
from pixel_models.blocks.layers import FirstLayer
from pixel_models.blocks.masks import MaskedConv2d


def reference_masked_conv(conv: MaskedConv2d, x):
    return F.conv2d(x, conv.weight * conv.mask, conv.bias, padding=conv.padding)


def lstm_update(gates, cell):
    """gates (..., 4, h, ...) laid out [i, f, o, g]; cell None for a zero state."""
    i, f, o = torch.sigmoid(gates[:, :3]).unbind(1)
    g = torch.tanh(gates[:, 3])
    cell = i * g if cell is None else f * cell + i * g
    return o * torch.tanh(cell), cell


def with_class_bias(layer, gates, label):
    return gates if layer.class_bias is None else gates + layer.class_bias(label)[:, :, None, None]


def reference_row_lstm(layer: RowLSTMLayer, x, label=None):
    b, _, height, width = x.shape
    gates_in = with_class_bias(layer, reference_masked_conv(layer.input_to_state, x), label)
    state, rows = None, []
    for i in range(height):
        gates = gates_in[:, :, i]
        if state is not None:
            gates = gates + layer.state_to_state(state[0])
        state = lstm_update(gates.view(b, 4, layer.hidden, width), None if state is None else state[1])
        rows.append(state[0])
    return reference_masked_conv(layer.output, torch.stack(rows, 2))


def skew(x):
    n, m = x.shape[-2:]
    out = x.new_zeros(*x.shape[:-1], n + m - 1)
    for r in range(n):
        out[..., r, r : r + m] = x[..., r, :]
    return out


def unskew(x, m):
    return torch.stack([x[..., r, r : r + m] for r in range(x.shape[-2])], -2)


def reference_diagonal_bilstm(layer: DiagonalBiLSTMLayer, x, image, label=None):
    b, _, n, m = x.shape
    h = layer.hidden
    gates_in = with_class_bias(layer, reference_masked_conv(layer.input_to_state, x), label)
    l2r = gates_in[:, : 4 * h]
    r2l = (gates_in[:, 4 * h :] + layer.image_to_state(image)).flip(-1)
    skewed = skew(torch.cat([l2r, r2l], 1)).view(b, 2, 4, h, n, n + m - 1)
    state, columns = None, []
    for d in range(n + m - 1):
        gates = skewed[..., d]
        if state is not None:
            above_and_left = F.pad(state[0].reshape(b, 2 * h, n), (1, 0))
            gates = gates + layer.state_to_state(above_and_left).view(b, 2, 4, h, n)
        i, f, o = torch.sigmoid(gates[:, :, :3]).unbind(2)
        g = torch.tanh(gates[:, :, 3])
        cell = i * g if state is None else f * state[1] + i * g
        state = (o * torch.tanh(cell), cell)
        columns.append(state[0])
    hidden = unskew(torch.stack(columns, -1), m)  # (B, 2, h, n, m)
    shifted = F.pad(hidden[:, 1].flip(-1)[:, :, :-1], (0, 0, 1, 0))
    return reference_masked_conv(layer.output, hidden[:, 0] + shifted)


def assert_same_function(layer, reference, *inputs, label=None):
    """Outputs and gradients (inputs and parameters) equal within 1e-6, float64."""
    layer = layer.double()
    inputs = [x.double().requires_grad_() for x in inputs]
    params = list(layer.parameters())
    extra = () if label is None else (label,)
    out, expected = layer(*inputs, *extra), reference(layer, *inputs, *extra)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs + params, upstream, allow_unused=True)
    want = torch.autograd.grad(expected, inputs + params, upstream, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        g = torch.zeros_like(w) if g is None and w is not None else g
        w = torch.zeros_like(g) if w is None and g is not None else w
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in got[len(inputs) :])


@pytest.mark.parametrize("num_colors", [1, 3])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_equals_full_masked_kernel(num_colors, kernel_size, mask_type):
    conv = MaskedConv2d(6, 9, kernel_size, mask_type, num_colors)
    assert_same_function(conv, reference_masked_conv, torch.randn(3, 6, 5, 7))


def test_row_kernel_and_first_layer_equal_full_masked_kernels():
    assert_same_function(
        MaskedConv2d(6, 12, (1, 5), "B", 3, out_chunks=4), reference_masked_conv, torch.randn(2, 6, 4, 6)
    )
    for num_channels in (1, 3):  # one input map takes its own path (unfolded windows)
        for size in [(8, 9), (1, 1), (2, 5)]:
            first, image = FirstLayer(num_channels, 12), torch.rand(2, num_channels, *size)
            assert_same_function(first, reference_masked_conv, image)
            with torch.no_grad():  # (evaluation and sampling take the convolution)
                torch.testing.assert_close(
                    first(image.double()), reference_masked_conv(first, image.double())
                )


def test_residual_block_equals_reference():
    block = ResidualBlock(6, 3)

    def reference(block, x):
        x = reference_masked_conv(block.reduce, torch.relu(x))
        x = reference_masked_conv(block.conv, torch.relu(x))
        return reference_masked_conv(block.expand, torch.relu(x))

    assert_same_function(block, reference, torch.randn(2, 12, 6, 5))


@pytest.fixture(params=["torch.tanh", "2 sigmoid(2x) - 1"])
def tanh_form(request, monkeypatch):
    """Each of the recurrences' two ways to compute tanh, whichever this machine would pick."""
    by_sigmoid = request.param != "torch.tanh"
    monkeypatch.setattr(recurrence, "tanh_through_sigmoid", lambda like: by_sigmoid)
    return request.param


def test_tanh_form_is_chosen_by_measuring_both_on_the_cpu_only():
    def slow_tanh(x, out):  # four times the work of a tanh
        for _ in range(4):
            torch.tanh(x, out=out)

    measure = recurrence._cpu_tanh_is_slow.__wrapped__
    assert measure(torch.float32, tanh=slow_tanh, sigmoid=torch.tanh) is True
    assert measure(torch.float32, tanh=torch.tanh, sigmoid=slow_tanh) is False
    assert recurrence.tanh_through_sigmoid(torch.empty(2, device="meta")) is False  # off the CPU: never
    choice = recurrence.tanh_through_sigmoid(torch.empty(2))
    assert choice in (True, False) and recurrence.tanh_through_sigmoid(torch.empty(3)) is choice


@pytest.mark.parametrize("num_colors", [1, 3])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("size", [(5, 7), (1, 4), (6, 1), (3, 3)])
def test_row_lstm_layer_equals_plain_loop(tanh_form, num_colors, kernel_size, size):
    layer = RowLSTMLayer(6, num_colors, kernel_size)
    assert_same_function(layer, reference_row_lstm, torch.randn(3, 12, *size))


@pytest.mark.parametrize("num_colors", [1, 3])
@pytest.mark.parametrize("size", [(5, 7), (7, 4), (1, 1), (1, 5), (6, 1), (4, 4)])
def test_diagonal_bilstm_layer_equals_plain_loop(tanh_form, num_colors, size):
    layer = DiagonalBiLSTMLayer(6, num_colors)
    assert_same_function(
        layer, reference_diagonal_bilstm, torch.randn(3, 12, *size), torch.rand(3, num_colors, *size)
    )


@pytest.fixture
def nan_filled_new_memory(monkeypatch):
    """Every tensor made with empty / empty_like / new_empty starts as NaN, not as whatever memory held:
    a layer that reads a cell it never wrote (the recurrences leave off-image cells unset) gives NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def nan_empty(*size, **kwargs):
        return empty(*size, **kwargs).fill_(float("nan"))

    def nan_empty_like(like, **kwargs):
        return empty_like(like, **kwargs).fill_(float("nan"))

    def nan_new_empty(self, *size, **kwargs):
        return new_empty(self, *size, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)


@pytest.mark.parametrize("num_colors", [1, 3])
def test_recurrent_layers_never_read_memory_they_did_not_write(tanh_form, nan_filled_new_memory, num_colors):
    assert torch.empty(2).isnan().all() and torch.zeros(1).new_empty(2).isnan().all()
    row = RowLSTMLayer(6, num_colors, 3)
    assert_same_function(row, reference_row_lstm, torch.randn(3, 12, 5, 7))
    diagonal = DiagonalBiLSTMLayer(6, num_colors)
    for size in [(5, 7), (7, 4), (1, 5), (6, 1)]:
        x, image = torch.randn(3, 12, *size), torch.rand(3, num_colors, *size)
        assert_same_function(diagonal, reference_diagonal_bilstm, x, image)


def test_conditional_layers_equal_plain_loops_with_the_class_bias_on_the_gates():
    label = torch.tensor([0, 2, 1])
    row = RowLSTMLayer(6, 3, 3, num_classes=3)
    torch.nn.init.normal_(row.class_bias.table.weight)
    assert_same_function(row, reference_row_lstm, torch.randn(3, 12, 4, 5), label=label)
    diagonal = DiagonalBiLSTMLayer(6, 3, num_classes=3)
    torch.nn.init.normal_(diagonal.class_bias.table.weight)
    x, image = torch.randn(3, 12, 4, 5), torch.rand(3, 3, 4, 5)
    assert_same_function(diagonal, reference_diagonal_bilstm, x, image, label=label)


@pytest.mark.parametrize("arch", ["row_lstm", "diag_bilstm"])
def test_checkpoint_recurrence_gives_equal_gradients(arch):
    kwargs = dict(num_channels=3, num_levels=4, hidden=6, num_layers=2, output_hidden=12)
    plain = build_network(arch, **kwargs).double()
    recomputed = build_network(arch, checkpoint_recurrence=True, **kwargs).double()
    recomputed.load_state_dict(plain.state_dict())
    assert all(layer.recompute_in_backward for layer in recomputed.stack.layers)
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    out_plain, out_recomputed = plain(x), recomputed(x)
    torch.testing.assert_close(out_recomputed, out_plain, rtol=0, atol=0)
    grads_plain = torch.autograd.grad(out_plain.square().sum(), list(plain.parameters()))
    grads_recomputed = torch.autograd.grad(out_recomputed.square().sum(), list(recomputed.parameters()))
    for a, b in zip(grads_recomputed, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_recurrence_runs_in_float32_and_under_no_grad(tanh_form):
    layer = DiagonalBiLSTMLayer(4, 1)
    x, image = torch.randn(2, 8, 4, 5), torch.rand(2, 1, 4, 5)
    with torch.no_grad():
        expected = reference_diagonal_bilstm(layer, x, image)
        torch.testing.assert_close(layer(x, image), expected, rtol=1e-5, atol=1e-5)
    row = RowLSTMLayer(4, 1)
    with torch.no_grad():
        torch.testing.assert_close(row(x), reference_row_lstm(row, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["pixelcnn", "row_lstm", "diag_bilstm"])
def test_training_step_under_bf16_autocast_runs_and_stays_close_to_float32(arch):
    net = build_network(arch, num_channels=3, num_levels=4, hidden=6, num_layers=2, output_hidden=12)
    x = torch.rand(2, 3, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.float(), net(x), rtol=0.05, atol=0.05)


def test_flop_counter_sees_every_product_of_the_recurrent_layers():
    """The model summary's FLOPs (torch's FlopCounterMode) must count the recurrences' in-place products.
    Expected: the layers' multiply-adds written out from their definitions, 2 FLOPs each: the kept taps of
    every convolution over all pixels; state-to-state for every step after the first, over the cells
    each step computes (the Row LSTM's whole rows; the Diagonal BiLSTM's on-image pixels)."""
    from torch.utils.flop_counter import FlopCounterMode

    b, h, height, width = 2, 4, 5, 6
    pixels = b * height * width
    x = torch.rand(b, 2 * h, height, width)
    row = RowLSTMLayer(h, 1, kernel_size=3)
    expected_row = 2 * (
        # input-to-state: the 2 of 3 taps the mask keeps, over each row and the pad column before it
        # (its outputs are dropped, but computed), less the first row's pad
        (height * (width + 1) - 1) * b * 2 * h * 4 * h * 2
        + (height - 1) * width * b * 3 * h * 4 * h  # state-to-state: 3 taps on the row above
        + pixels * h * 2 * h  # 1x1 output
    )
    diagonal = DiagonalBiLSTMLayer(h, 1)
    expected_diagonal = 2 * (
        pixels * 2 * h * 8 * h  # 1x1 input-to-state, both directions
        + pixels * 1 * 4 * h  # the right-to-left direction's image input
        + (pixels - b) * 2 * 2 * h * 4 * h  # 2 directions x 2 taps, every pixel but the first
        + pixels * h * 2 * h  # 1x1 output
    )
    for layer, args, expected in (
        (row, (x,), expected_row),
        (diagonal, (x, torch.rand(b, 1, height, width)), expected_diagonal),
    ):
        with FlopCounterMode(display=False) as counter:
            layer(*args)
        assert counter.get_total_flops() == expected, type(layer).__name__
