"""The LSTM recurrence of the PixelRNN layers as one autograd node with a hand-written backward.

Both LSTMs of *Pixel Recurrent Neural Networks* (van den Oord et al., 2016) advance a whole line of
cells per step (the Row LSTM a row, the Diagonal BiLSTM a skewed column of both directions), with

    gates_t = gates_in_t + sum_k W_k @ shift_k(h_{t-1})         [i, f, o, g] chunks of h features
    c_t = sigmoid(f) . c_{t-1} + sigmoid(i) . tanh(g),        h_t = sigmoid(o) . tanh(c_t)

where ``shift_k`` reads the previous step's hidden line at a fixed offset (the Row LSTM's k-wide
convolution along the row above; the Diagonal BiLSTM's taps above and to the left). ``gates_in`` is
computed for all steps before the recurrence (the layers' input-to-state convolutions).

Autograd through the plain loop records ~20 small nodes per step and replays them one by one; here
the forward writes the activations into preallocated buffers, and the backward walks the steps in
reverse with in-place products, leaving the state-to-state weight gradients to one matrix product
per tap after the loop. Results equal autograd through the loop (tested in float64).

Layout of one call, ``D`` independent recurrences (directions) batched together:
    gates_in (D, 4h, T, N): step t's input-to-state for N = L * B cells (positions outer, batch inner);
    hidden (D, h, T + 1, (L + pad) * B): slot t + 1 holds h_t at positions pad_before .. pad_before + L,
    zero in the padding and in slot 0, so that tap k reads positions offset_k .. offset_k + L of slot t.
"""

import functools
import time

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


def _count_in_place_products() -> None:
    """torch's FLOP counter (behind the model summary's FLOPs) knows ``addmm`` and ``baddbmm`` but not their
    in-place forms, which every step here uses; without this the Row LSTM would show a third of its FLOPs."""
    aten = torch.ops.aten
    for in_place, counted in ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm)):
        if in_place not in flop_registry:
            register_flop_formula(in_place, get_raw=True)(flop_registry[counted])


_count_in_place_products()


class LSTMRecurrence(torch.autograd.Function):
    """``hidden = LSTMRecurrence.apply(gates_in, offsets, pad, batch, *weights)``; see the module docstring.

    ``weights``: one (D, 4h, h) matrix per tap; ``offsets``: each tap's first position in the padded
    hidden line; ``pad``: (before, after) zero positions around the L positions; ``batch``: B. Returns
    the buffer (D, h, T + 1, (L + before + after) * B) described above (read it through views).
    """

    @staticmethod
    def forward(ctx, gates_in, offsets, pad, batch, *weights):
        dtype = _compute_dtype(gates_in.dtype, weights)
        with _no_autocast(gates_in):
            # (D, 4h, T, N), or (D, 4h, T, L, B) viewed as that; becomes the activations, kept for backward
            shape = (*gates_in.shape[:3], gates_in[0, 0, 0].numel())
            gates = torch.empty(shape, dtype=dtype, device=gates_in.device)
            gates.view(gates_in.shape).copy_(gates_in)
            cast = [w.to(dtype) for w in weights]
            hidden, cell, tanh_cell = run_forward(gates, cast, offsets, pad, batch)
        ctx.save_for_backward(gates, cell, tanh_cell, hidden, *cast)
        ctx.layout = (offsets, pad, batch)
        ctx.dtypes = (gates_in.dtype, [w.dtype for w in weights])
        ctx.input_shape = gates_in.shape
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden):
        gates, cell, tanh_cell, hidden, *weights = ctx.saved_tensors
        with _no_autocast(gates):
            # Gradients reaching h_t: from the output (slot t + 1) and, added step by step, from step t + 1.
            grad_h = grad_hidden[:, :, 1:].to(gates.dtype, copy=True)
            grad_gates, weight_grads = run_backward(
                grad_h, gates, cell, tanh_cell, hidden, weights, *ctx.layout
            )
        input_dtype, weight_dtypes = ctx.dtypes
        weight_grads = [g.to(d) for g, d in zip(weight_grads, weight_dtypes, strict=True)]
        return (grad_gates.view(ctx.input_shape).to(input_dtype), None, None, None, *weight_grads)


def _compute_dtype(dtype: torch.dtype, weights) -> torch.dtype:
    """float32 under bf16 / fp16 autocast (the gates arrive in half precision, the weights are float32):
    the state runs through hundreds of steps, so it is kept at the weights' precision."""
    for w in weights:
        dtype = torch.promote_types(dtype, w.dtype)
    return dtype


def _no_autocast(like: torch.Tensor):
    return torch.autocast(device_type=like.device.type, enabled=False)


def tanh_through_sigmoid(like: torch.Tensor) -> bool:
    """Whether the recurrences compute tanh as 2 sigmoid(2x) - 1 for tensors like ``like``.

    The same function (within 2e-7 of torch.tanh in float32), and which is faster depends on the CPU:
    torch's CPU sigmoid is vectorized on every machine we measured, its tanh not on all of them (2.4 ns
    per float against the sigmoid's 0.3 on an AMD EPYC; 0.38 against 0.46 on another machine). So it
    is measured once per process and dtype (``_cpu_tanh_is_slow``, about a millisecond), and the
    sigmoid form is taken where tanh costs more than twice a sigmoid. Off the CPU: torch.tanh.
    """
    return like.device.type == "cpu" and _cpu_tanh_is_slow(like.dtype)


@functools.cache
def _cpu_tanh_is_slow(dtype: torch.dtype, tanh=torch.tanh, sigmoid=torch.sigmoid) -> bool:
    """Whether ``tanh`` takes more than twice as long as ``sigmoid`` on 16,384 values (best of 15 runs
    each, alternated): the margin keeps the choice the same from one process to the next on a machine."""
    x = torch.linspace(-4, 4, 16384, dtype=dtype)
    out = torch.empty_like(x)
    best = {tanh: float("inf"), sigmoid: float("inf")}
    for _ in range(15):
        for fn in best:
            start = time.perf_counter()
            fn(x, out=out)
            best[fn] = min(best[fn], time.perf_counter() - start)
    return best[tanh] > 2 * best[sigmoid]


def run_forward(gates, weights, offsets, pad, batch, active=None):
    """The forward recurrence on ``gates`` (D, 4h, T, N), which it turns into the activations in place.

    Returns ``hidden`` (D, h, T + 1, line), ``cell`` (D, h, T + 1, N; slot 0 zero) and ``tanh_cell``
    (D, h, T, N), everything ``run_backward`` needs. ``active``: per step the (start, stop) cells to
    compute, or None for all; the others keep zero state (the caller guarantees they would), and are
    left unset in the buffers returned, except where a step reads them (zero). tanh runs as torch.tanh
    or as 2 sigmoid(2x) - 1, whichever is faster here (``tanh_through_sigmoid``).
    """
    num_dirs, four_h, steps, cells = gates.shape
    h = four_h // 4
    before, after = pad
    line = cells + (before + after) * batch
    first = before * batch
    hidden = gates.new_empty(num_dirs, h, steps + 1, line)
    cell = gates.new_empty(num_dirs, h, steps + 1, cells)
    hidden[..., :first].zero_()
    hidden[..., first + cells :].zero_()
    for t, start, stop in _first_reads(active, cells, [(o - before) * batch for o in offsets]):
        hidden[:, :, t, first + start : first + stop].zero_()
    for t, start, stop in _first_reads(active, cells, [0]):
        cell[:, :, t, start:stop].zero_()
    tanh_cell = gates.new_empty(num_dirs, h, steps, cells)
    by_sigmoid = tanh_through_sigmoid(gates)
    # Views made once, not per step: per step they would cost more than the arithmetic at small h.
    flat, product = _step_operations(num_dirs)
    gates_at = [flat(step) for step in gates.unbind(2)]
    # i, f and o per step: only torch.tanh's form needs them (the sigmoid form takes the whole step)
    sigmoid_at = [] if by_sigmoid else [step[..., : 3 * h, :] for step in gates_at]
    chunks_at = [step.split(h, -2) for step in gates_at]
    cell_at = [flat(c) for c in cell.unbind(2)]
    tanh_at = [flat(c) for c in tanh_cell.unbind(2)]
    out_at = [flat(o) for o in hidden[:, :, 1:, first : first + cells].unbind(2)]
    taps_at = [
        (flat(w), [flat(x) for x in hidden[:, :, :, o * batch : o * batch + cells].unbind(2)])
        for w, o in zip(weights, offsets, strict=True)
    ]
    # x -> 2 x - 1 as one add (-1 + 2 x) with a 0-dim -1: on CPU a third of the time of a multiply and
    # a subtraction, or of an addcmul with two 0-dim operands (a slow path)
    minus_one = gates.new_full((), -1.0)
    cells_at, cut = _cutter(active, steps, cells)
    for t in range(steps):
        a, b = cells_at[t]
        step = cut(gates_at[t], a, b)
        if t > 0:
            for weight, above in taps_at:
                product(step, weight, cut(above[t], a, b))
        i, f, o, g = (cut(chunk, a, b) for chunk in chunks_at[t])
        if by_sigmoid:  # one sigmoid for all four gates, the candidate's pre-activation doubled first
            g.mul_(2)
            step.sigmoid_()
            torch.add(minus_one, g, alpha=2, out=g)
        else:
            cut(sigmoid_at[t], a, b).sigmoid_()
            g.tanh_()
        c = cut(cell_at[t + 1], a, b)
        tc = cut(tanh_at[t], a, b)
        torch.mul(f, cut(cell_at[t], a, b), out=c)
        c.addcmul_(i, g)
        if by_sigmoid:
            torch.mul(c, 2, out=tc).sigmoid_()
            torch.add(minus_one, tc, alpha=2, out=tc)
        else:
            torch.tanh(c, out=tc)
        torch.mul(o, tc, out=cut(out_at[t], a, b))
    return hidden, cell, tanh_cell


def _first_reads(active, cells, shifts):
    """(slot, start, stop): the cell ranges that step t reads from slot t (its previous state, at cells
    a + shift .. b + shift for each shift) before any step wrote them; zero state there. Slot 0 whole;
    then, with ``active``, the parts of a step's reads outside the previous step's cells (in the
    Diagonal BiLSTM, the cell where a row starts). Cells wholly outside 0 .. N are padding."""
    yield 0, 0, cells
    if active is None:
        return
    for t in range(1, len(active)):
        (a, b), (written_a, written_b) = active[t], active[t - 1]
        for shift in shifts:
            start, stop = max(0, a + shift), min(cells, b + shift)
            for lo, hi in ((start, min(stop, written_a)), (max(start, written_b), stop)):
                if lo < hi:
                    yield t, lo, hi


def _cutter(active, steps, cells):
    """Each step's (start, stop) cells, and how a step reads them: a slice of the active ones, or (all
    active) the view itself, which saves a view per operand and step."""
    if active is None:
        return [(0, cells)] * steps, lambda view, a, b: view
    return active, lambda view, a, b: view[..., a:b]


def _step_operations(num_dirs):
    """``flat``, which makes a step's (D, ...) view a plain matrix when there is one direction, and the
    in-place tap product that goes with it: addmm_ on matrices skips baddbmm_'s per-batch dispatch."""
    if num_dirs == 1:
        return (lambda view: view[0]), torch.Tensor.addmm_
    return (lambda view: view), torch.Tensor.baddbmm_


def run_backward(
    grad_h, gates, cell, tanh_cell, hidden, weights, offsets, pad, batch, active=None, weight_grads=True
):
    """Backward through time. ``grad_h`` (D, h, T, line): the loss's gradient with respect to each h_t
    from outside the recurrence, in the hidden buffer's layout without slot 0; it is accumulated into
    in place. Returns the gradients of the gates' input (D, 4h, T, N; with ``active``, set on the active
    cells only) and of each tap's weight (None with ``weight_grads=False``, which ``active`` requires: off
    the active cells the hidden buffer is unset, so the caller computes them over its own cells).

    With gates [i, f, o, g] after their nonlinearities, c_t = f c_{t-1} + i g and h_t = o tanh(c_t), a
    step turns dL/dh_t (dh) and dL/dc_t from step t + 1 (carry) into

        dc = carry + dh o (1 - tanh(c_t)^2)
        d(pre-activation) of i: dc g i (1 - i),   f: dc c_{t-1} f (1 - f),   g: dc i (1 - g^2),
                             o: dh tanh(c_t) o (1 - o)

    and passes dc f on as the next carry. The gates' local derivatives are computed in the loop, on the
    step's cells while they are in cache: as one pass over all steps before the loop (the gates of every
    step, several times the cache) they took longer than the loop's extra operations.
    """
    num_dirs, four_h, steps, cells = gates.shape
    h = four_h // 4
    first = pad[0] * batch
    if active is not None and weight_grads:
        raise ValueError(
            "with active cells the hidden buffer is unset off them: compute weight grads outside"
        )
    grad_gates = torch.empty_like(gates)
    flat, product = _step_operations(num_dirs)
    dh_at = [flat(x) for x in grad_h[:, :, :, first : first + cells].unbind(2)]
    taps_at = [
        (flat(w.transpose(1, 2)), [flat(x) for x in grad_h[:, :, :, o * batch : o * batch + cells].unbind(2)])
        for w, o in zip(weights, offsets, strict=True)
    ]
    grad_at = [flat(x) for x in grad_gates.unbind(2)]
    sigmoids_at = [flat(x) for x in gates[:, : 3 * h].unbind(2)]
    grad_sigmoids_at = [flat(x) for x in grad_gates[:, : 3 * h].unbind(2)]
    chunks_at = [flat(x).split(h, -2) for x in gates.unbind(2)]
    grad_chunks_at = [flat(x).split(h, -2) for x in grad_gates.unbind(2)]
    # (2, h, N) per step (D in front with several directions): the input and forget gates' gradients,
    # both driven by dL/dc
    grad_if_at = [flat(x) for x in grad_gates[:, : 2 * h].unflatten(1, (2, h)).unbind(3)]
    cell_at = [flat(x) for x in cell.unbind(2)]
    tanh_at = [flat(x) for x in tanh_cell.unbind(2)]
    one = gates.new_ones(())
    grad_c = flat(gates.new_empty(num_dirs, h, cells))
    grad_c_pair = grad_c[..., None, :, :]
    cell_from_h = flat(gates.new_empty(num_dirs, h, cells))  # dc_t/dh_t's factor o (1 - tanh(c_t)^2)
    carry = flat(gates.new_zeros(num_dirs, h, cells))  # dL/dc_t from step t + 1: dc_{t+1} . f_{t+1}
    cells_at, cut = _cutter(active, steps, cells)
    for t in reversed(range(steps)):
        a, b = cells_at[t]
        if t < steps - 1:
            a1, b1 = cells_at[t + 1]
            upstream = cut(grad_at[t + 1], a1, b1)
            for weight_t, below in taps_at:
                product(cut(below[t], a1, b1), weight_t, upstream)
        i, f, o, g = (cut(x, a, b) for x in chunks_at[t])
        grad_i, grad_f, grad_o, grad_g = (cut(x, a, b) for x in grad_chunks_at[t])
        sigmoids = cut(sigmoids_at[t], a, b)
        torch.addcmul(sigmoids, sigmoids, sigmoids, value=-1, out=cut(grad_sigmoids_at[t], a, b))  # s (1 - s)
        torch.addcmul(one, g, g, value=-1, out=grad_g).mul_(i)
        grad_i.mul_(g)
        grad_f.mul_(cut(cell_at[t], a, b))
        tc = cut(tanh_at[t], a, b)
        grad_o.mul_(tc)
        from_h = cut(cell_from_h, a, b)
        torch.addcmul(one, tc, tc, value=-1, out=from_h).mul_(o)
        dh = cut(dh_at[t], a, b)
        dc, after = cut(grad_c, a, b), cut(carry, a, b)
        torch.addcmul(after, dh, from_h, out=dc)
        grad_o.mul_(dh)
        cut(grad_if_at[t], a, b).mul_(cut(grad_c_pair, a, b))
        grad_g.mul_(dc)
        torch.mul(dc, f, out=after)
    if not weight_grads:
        return grad_gates, None
    # State-to-state weights: every step's gate gradient against the hidden line it read, at once.
    flat_grad = grad_gates.view(num_dirs, four_h, steps * cells)
    weight_grads = []
    for o in offsets:
        start = o * batch
        read = hidden[:, :, :steps, start : start + cells].reshape(num_dirs, h, steps * cells)
        weight_grads.append(torch.bmm(flat_grad, read.transpose(1, 2)))
    return grad_gates, weight_grads


# torch.compile runs the three entry points below eagerly, as calls between compiled pieces: tracing
# them would unroll every step of every layer into the graph (minutes of compiling, for ops that are
# already one autograd node), and AOT autograd cannot rebuild the views of the step buffers they return.
@torch.compiler.disable
def lstm_recurrence(
    gates_in: torch.Tensor,
    weights: list[torch.Tensor],
    offsets: tuple[int, ...],
    pad: tuple[int, int],
    batch: int,
) -> torch.Tensor:
    """Run the recurrence (see the module docstring); returns the hidden buffer (D, h, T + 1, line)."""
    return LSTMRecurrence.apply(gates_in, tuple(offsets), tuple(pad), batch, *weights)


def _skewed(steps: torch.Tensor, direction: int, rows: int, cols: int, batch: int) -> torch.Tensor:
    """The on-image cells of one direction of a (2, F, T, L, B) step buffer (or of the hidden buffer,
    (2, F, T + 1, L + 1, B) with its first slot and pad row skipped), as an (F, n, m, B) view:
    pixel (r, j) sits at step r + j, position r."""
    _, features, slots, positions, _ = steps.shape
    base = steps[direction]
    if positions == rows + 1:  # the hidden buffer: h_t in slot t + 1, a zero pad row on top
        base = base[:, 1:, 1:]
    slot, position = positions * batch, batch
    return base.as_strided(
        (features, rows, cols, batch), (slots * positions * batch, slot + position, slot, 1)
    )


def _diagonals(rows: int, cols: int, batch: int) -> list[tuple[int, int]]:
    """The cells of each step on the image: diagonal d covers rows max(0, d - m + 1) .. min(n - 1, d).

    In the plain skewed recurrence off-image cells have zero input and zero state around them, so their
    state stays exactly zero: skipping them halves the work and changes nothing.
    """
    return [(max(0, d - cols + 1) * batch, (min(rows - 1, d) + 1) * batch) for d in range(rows + cols - 1)]


class DiagonalRecurrence(torch.autograd.Function):
    """A whole Diagonal BiLSTM layer as one autograd node: its 1x1 input-to-state products, both
    directions' recurrences, and the 1x1 output convolution of their sum.

    ``out = DiagonalRecurrence.apply(x, image, weight, bias, image_weight, class_bias, above, left,
    out_weight, out_bias)``: the layer input x (B, F, n, m) and the network's input image (B, C, n, m);
    the masked 1x1 input-to-state weight (8h, F) (rows: left-to-right gates, then right-to-left) and its
    bias (8h,); the right-to-left direction's image weight (4h, C); a per-image gate bias (B, 8h) or None;
    tap weights (2, 4h, h) for the pixel above and the pixel to the left (of each direction's own map);
    the masked 1x1 output weight (F_out, h) and bias (F_out,). Returns the layer's output (B, F_out, n, m):
    the output convolution of the left-to-right hidden maps plus the right-to-left ones moved one row
    down (``DiagonalBiLSTMLayer.compute`` says why).

    The products run here with the batch innermost, so that every copy moves runs of B values: x is
    copied once to (F, n, m, B) and read once mirrored (the right-to-left direction runs on the mirrored
    map), each direction's gates are one matrix product (4h, F) @ (F, n m B), skewing copies them into
    the step buffer (2, 4h, n + m - 1, n, B) (step d holds diagonal d, position r its pixel of row r;
    off-image cells are never computed: their state stays exactly zero, as in the plain skewed recurrence
    with zero input there), and unskewing gathers both directions' hidden maps into one (h, n, m, B) sum
    for the output product. The output is a (B, F_out, n, m) view of that (F_out, n, m, B) product.
    """

    @staticmethod
    def forward(ctx, x, image, weight, bias, image_weight, class_bias, above, left, out_weight, out_bias):
        b, features, n, m = x.shape
        four_h = weight.shape[0] // 2
        inputs = (x, image, weight, bias, image_weight, class_bias, above, left, out_weight, out_bias)
        ctx.dtypes = [None if t is None else t.dtype for t in inputs]
        device = x.device.type
        # Under autocast the products run as autocast runs a convolution (in its lower precision), the
        # recurrence at the tap weights' precision (``_compute_dtype``).
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        dtype = _compute_dtype(low, (above, left))
        with _no_autocast(x):
            weight, bias, image_weight = weight.to(low), bias.to(low), image_weight.to(low)
            out_weight, out_bias = out_weight.to(low), out_bias.to(low)
            x_t = x.to(low).permute(1, 2, 3, 0).contiguous()  # (F, n, m, B)
            image_mirrored = image.to(low).flip(3).permute(1, 2, 3, 0).contiguous()  # (C, n, m, B)
            left_to_right = torch.addmm(bias[:four_h, None], weight[:four_h], x_t.view(features, -1))
            right_to_left = torch.addmm(
                bias[four_h:, None], weight[four_h:], x_t.flip(2).view(features, -1)
            ).addmm_(image_weight, image_mirrored.view(len(image_mirrored), -1))
            if class_bias is not None:
                per_image = class_bias.to(low).t()[:, None]  # (8h, 1, B)
                left_to_right.view(four_h, -1, b).add_(per_image[:four_h])
                right_to_left.view(four_h, -1, b).add_(per_image[four_h:])
            steps = x.new_empty(2, four_h, n + m - 1, n, b, dtype=dtype)
            for direction, gates_in in enumerate((left_to_right, right_to_left)):
                _skewed(steps, direction, n, m, b).copy_(gates_in.view(four_h, n, m, b))
            gates = steps.view(2, four_h, n + m - 1, n * b)
            taps = (above.to(dtype), left.to(dtype))
            hidden, cell, tanh_cell = run_forward(gates, taps, (0, 1), (1, 0), b, _diagonals(n, m, b))
            h = four_h // 4
            view = hidden.view(2, h, n + m, n + 1, b)
            summed = hidden.new_empty(h, n, m, b).copy_(_skewed(view, 0, n, m, b))
            # The right-to-left maps back in image order, one row down.
            summed[:, 1:] += _skewed(view, 1, n, m, b).flip(2)[:, :-1]
            summed = summed.view(h, -1).to(low)
            out = torch.addmm(out_bias[:, None], out_weight, summed)
        saved = (gates, cell, tanh_cell, hidden, *taps, x_t, image_mirrored, weight, image_weight)
        ctx.save_for_backward(*saved, out_weight, summed)
        return out.view(len(out), n, m, b).permute(3, 0, 1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # read once: activation checkpointing allows only one unpacking
        gates, cell, tanh_cell, hidden, above, left, x_t, image_mirrored, weight, image_weight = saved[:10]
        out_weight, summed = saved[10:]
        b, _, n, m = grad_out.shape
        h = out_weight.shape[1]
        four_h, features, colors = 4 * h, len(x_t), len(image_mirrored)
        with _no_autocast(gates):
            grad_out = grad_out.to(summed.dtype).permute(1, 2, 3, 0).reshape(len(out_weight), -1)
            grad_out_weight = grad_out @ summed.t()
            grad_out_bias = grad_out.sum(1)
            grad_summed = (out_weight.t() @ grad_out).view(h, n, m, b)
            # Only the on-image cells of grad_h are read (the taps also add into off-image ones, unread).
            grad_h = gates.new_empty(2, h, n + m, n + 1, b)
            _skewed(grad_h, 0, n, m, b).copy_(grad_summed)
            right_to_left_grad = _skewed(grad_h, 1, n, m, b)
            right_to_left_grad[:, :-1].copy_(grad_summed[:, 1:].flip(2))
            right_to_left_grad[:, -1].zero_()
            grad_h = grad_h[:, :, 1:].view(2, h, n + m - 1, (n + 1) * b)
            grad_gates, _ = run_backward(
                grad_h,
                gates,
                cell,
                tanh_cell,
                hidden,
                (above, left),
                (0, 1),
                (1, 0),
                b,
                _diagonals(n, m, b),
                weight_grads=False,
            )
            grad_steps = grad_gates.view(2, four_h, n + m - 1, n, b)
            # Each direction's gate gradients back in image order (4h, n m B), at the recurrence's precision
            # for the tap weights' gradients, then in the products' precision for the rest.
            grad_dirs = [_skewed(grad_steps, d, n, m, b).contiguous().view(four_h, -1) for d in range(2)]
            hidden_maps = hidden.view(2, h, n + m, n + 1, b)
            tap_grads = [
                _tap_weight_grads(grad_d, _skewed(hidden_maps, d, n, m, b).contiguous())
                for d, grad_d in enumerate(grad_dirs)
            ]
            grad_l2r_gates, grad_r2l_gates = (g.to(x_t.dtype) for g in grad_dirs)
            grad_above, grad_left = (torch.stack(pair) for pair in zip(*tap_grads, strict=True))
            flat, mirrored = x_t.view(features, -1), x_t.flip(2).view(features, -1)
            grad_weight = torch.cat([grad_l2r_gates @ flat.t(), grad_r2l_gates @ mirrored.t()])
            grad_bias = torch.cat([grad_l2r_gates.sum(1), grad_r2l_gates.sum(1)])
            grad_image_weight = grad_r2l_gates @ image_mirrored.view(colors, -1).t()
            grad_class_bias = grad_x = grad_image = None
            if ctx.needs_input_grad[5]:
                per_image = [g.view(four_h, -1, b).sum(1) for g in (grad_l2r_gates, grad_r2l_gates)]
                grad_class_bias = torch.cat(per_image).t()
            if ctx.needs_input_grad[0]:
                grad_x_t = (weight[:four_h].t() @ grad_l2r_gates).view(features, n, m, b)
                grad_x_t += (weight[four_h:].t() @ grad_r2l_gates).view(features, n, m, b).flip(2)
                grad_x = grad_x_t.permute(3, 0, 1, 2)
            if ctx.needs_input_grad[1]:
                grad_image = (image_weight.t() @ grad_r2l_gates).view(colors, n, m, b).flip(2)
                grad_image = grad_image.permute(3, 0, 1, 2)
        grads = (grad_x, grad_image, grad_weight, grad_bias, grad_image_weight, grad_class_bias)
        grads += (grad_above, grad_left, grad_out_weight, grad_out_bias)
        return tuple(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True))


def _tap_weight_grads(grad_gates: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction's state-to-state weight gradients, from its gate gradients (4h, n m B) and hidden
    maps (h, n, m, B) in image order (of its own map): pixel (r, j)'s gates read h(r - 1, j) (tap above)
    and h(r, j - 1) (tap left), zero off the image. Over the on-image pixels only, half the skewed grid.

    Flattened, h(r, j - 1) is h one pixel (B values) back; that also pairs each row's first pixel with
    the last pixel of the row above, which the correction product takes out again.
    """
    four_h = len(grad_gates)
    h, n, m, b = hidden.shape
    flat = hidden.view(h, -1)
    above = grad_gates[:, m * b :] @ flat[:, : -m * b].t()
    left = grad_gates[:, b:] @ flat[:, :-b].t()
    row_starts = grad_gates.view(four_h, n, m, b)[:, 1:, 0].reshape(four_h, -1)
    row_ends = hidden[:, :-1, m - 1].reshape(h, -1)
    left -= row_starts @ row_ends.t()
    return above, left


@torch.compiler.disable
def diagonal_recurrence(
    x, image, weight, bias, image_weight, class_bias, above, left, out_weight, out_bias
) -> torch.Tensor:
    """A Diagonal BiLSTM layer's output (B, F_out, n, m): ``DiagonalRecurrence``."""
    return DiagonalRecurrence.apply(
        x, image, weight, bias, image_weight, class_bias, above, left, out_weight, out_bias
    )


@torch.compiler.disable
def row_input_to_state(x, weight, bias) -> torch.Tensor:
    """The Row LSTM's input-to-state gates (G, H, W, B): ``RowInputToState``."""
    return RowInputToState.apply(x, weight, bias)


class RowInputToState(torch.autograd.Function):
    """The Row LSTM's 1 x k mask-B input-to-state convolution over the taps the mask keeps, output laid
    out for ``LSTMRecurrence``: ``RowInputToState.apply(x, weight, bias)`` with x (B, F, H, W), weight
    (G, F, taps) (tap t reads column j - taps + 1 + t), bias (G,) -> (G, H, W, B).

    The input is copied once, batch innermost and zero padded on the left of every row,
    (F, H, W + taps - 1, B); flattened, tap t's shifted input is then a plain column range of one
    matrix, so each tap is one matrix product on a slice, forward and backward, with no im2col copy.
    The few outputs that fall on the pad columns read across a row boundary and are dropped.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        device = x.device.type
        # Under autocast, what autocast would do for a convolution: everything in its lower precision.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        b, features, height, width = x.shape
        taps = weight.shape[2]
        pad = taps - 1
        padded = x.new_empty(features, height, width + pad, b)
        padded[:, :, :pad].zero_()
        padded[:, :, pad:].copy_(x.permute(1, 2, 3, 0))
        flat = padded.view(features, -1)
        out = x.new_empty(len(weight), height, width + pad, b)
        target = out.view(len(weight), -1)[:, pad * b :]
        count = target.shape[1]
        torch.addmm(bias[:, None], weight[:, :, 0], flat[:, :count], out=target)
        for t in range(1, taps):
            target.addmm_(weight[:, :, t], flat[:, t * b : t * b + count])
        ctx.save_for_backward(flat, weight)
        ctx.shape = (b, height, width)
        return out[:, :, pad:]

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight = ctx.saved_tensors
        b, height, width = ctx.shape
        taps = weight.shape[2]
        pad = taps - 1
        grad = weight.new_empty(len(weight), height, width + pad, b)
        grad[:, :, :pad].zero_()
        grad[:, :, pad:].copy_(grad_out)
        target = grad.view(len(weight), -1)[:, pad * b :]
        count = target.shape[1]
        # Tap t reads columns t B .. t B + count: tap 0 sets the first count, the last (taps - 1) B start
        # at zero, and the other taps add on.
        grad_flat = torch.empty_like(flat)
        grad_flat[:, :count].addmm_(weight[:, :, 0].t(), target, beta=0)
        grad_flat[:, count:].zero_()
        grad_weight = torch.empty_like(weight)
        for t in range(taps):
            if t > 0:
                grad_flat[:, t * b : t * b + count].addmm_(weight[:, :, t].t(), target)
            torch.mm(target, flat[:, t * b : t * b + count].t(), out=grad_weight[:, :, t])
        grad_x = grad_flat.view(-1, height, width + pad, b)[:, :, pad:].permute(3, 0, 1, 2)
        grads = (grad_x, grad_weight, target.sum(1))
        return tuple(g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True))
