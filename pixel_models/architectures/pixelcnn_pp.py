"""PixelCNN++, as in Salimans, Karpathy, Chen & Kingma, *PixelCNN++: Improving the PixelCNN with Discretized
Logistic Mixture Likelihood and Other Modifications* (ICLR 2017), section 2 and the authors' code.

No masks and no blind spot: two streams of shifted convolutions. The *u* stream ("up", down-shifted 2x3
convolutions padded above) sees every pixel of the rows above; the *ul* stream ("up-left",
down-right-shifted 2x2 convolutions padded above and to the left, reading u too) adds the pixels to the
left on the current row. Both start one row (u) or one pixel (ul) shifted, so nothing of the current
pixel is seen, and the output distribution handles a pixel's colours itself (the logistic mixture's
linear dependence of G on R and B on R, G; see ``distributions.logistic_mixture``).

Layers: gated ResNet blocks (concatenated ELU; conv, optional 1x1 of the other stream's features,
concatenated ELU, dropout, conv to 2F maps, x + a * sigmoid(b)). ``num_stages`` stages: the up pass runs
``num_resnet`` blocks per stage and downsamples with stride-2 shifted convolutions between stages; the
down pass runs ``num_resnet`` blocks at the lowest stage and ``num_resnet + 1`` at the others, after
upsampling with shifted transposed convolutions, each block reading (1x1) the up pass's output of the
same position in reverse order: the shortcut connections. H and W must be divisible by
2 ** (num_stages - 1). Conditional (``num_classes`` > 0): a learned per-class bias on every block's gate.

With an output that does not read the pixel's earlier colours (the categorical softmax) and C > 1, a
small masked head adds them: a 1x1 mask-A convolution of the pixel's own colours joins the 1x1 of
ELU(ul), then ReLU + 1x1 mask-B output layers (``blocks.layers.OutputLayers``), so G's logits see R and
B's see R and G. With the mixture (or C=1) the output is the paper's 1x1 of ELU(ul).

Not reproduced: weight normalization with data-dependent init and Polyak averaging of the weights.

``PixelCNNPP.cached_stepper()`` samples with caches of every layer: see ``CachedPixelCNNPPStepper``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pixel_models.blocks.conditioning import class_bias, class_index
from pixel_models.blocks.layers import OutputLayers, check_input
from pixel_models.blocks.masks import MaskedConv2d
from pixel_models.distributions import build_distribution


def concat_elu(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return F.elu(torch.cat([x, -x], dim))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every row down by one; the top row becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    """Move every column right by one; the left column becomes zeros."""
    return F.pad(x, (1, 0))[:, :, :, :-1]


class ShiftedConv2d(nn.Conv2d):
    """A (kh, kw) convolution zero padded kh - 1 rows above (none below), ``left`` columns on the left and
    kw - 1 - left on the right: output (i, j) reads rows i - kh + 1 .. i, columns j - left ..
    j - left + kw - 1.
    Down-shifted: (2, 3) with left 1; down-right-shifted: (2, 2) with left 1; (2, 1) with left 0."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], left: int, stride=1
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.left = left
        self.padding_lrtb = (left, kernel_size[1] - 1 - left, kernel_size[0] - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.padding_lrtb))


def down_shifted(in_channels: int, out_channels: int, stride: int = 1) -> ShiftedConv2d:
    return ShiftedConv2d(in_channels, out_channels, (2, 3), left=1, stride=stride)


def down_right_shifted(in_channels: int, out_channels: int, stride: int = 1) -> ShiftedConv2d:
    return ShiftedConv2d(in_channels, out_channels, (2, 2), left=1, stride=stride)


def down_shifted_upsample(features: int) -> nn.ConvTranspose2d:
    """x2 upsampling; output (p, q) reads input row p // 2, columns (q - 1) // 2 .. (q + 1) // 2."""
    return nn.ConvTranspose2d(features, features, (2, 3), stride=2, padding=(0, 1), output_padding=(0, 1))


def down_right_shifted_upsample(features: int) -> nn.ConvTranspose2d:
    """x2 upsampling; output (p, q) reads input (p // 2, q // 2) only."""
    return nn.ConvTranspose2d(features, features, 2, stride=2)


class GatedResNet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(dropout(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux)))))."""

    def __init__(self, features: int, conv, aux_features: int, dropout: float, num_classes: int):
        super().__init__()
        self.conv_in = conv(2 * features, features)
        self.aux = nn.Conv2d(2 * aux_features, features, 1) if aux_features else None
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv(2 * features, 2 * features)
        self.class_bias = class_bias(num_classes, 2 * features)

    def hidden(self, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_in(concat_elu(x))
        if self.aux is not None:
            h = h + self.aux(concat_elu(aux))
        return h

    def gate(self, x: torch.Tensor, gates: torch.Tensor, dim: int = 1) -> torch.Tensor:
        a, b = gates.chunk(2, dim)
        return x + a * torch.sigmoid(b)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
        gates = self.conv_out(self.dropout(concat_elu(self.hidden(x, aux))))
        if self.class_bias is not None:
            gates = gates + self.class_bias(index)[:, :, None, None]
        return self.gate(x, gates)


class PixelCNNPP(nn.Module):
    def __init__(
        self,
        num_channels: int,
        num_levels: int,
        num_filters: int = 32,
        num_resnet: int = 2,
        num_stages: int = 3,
        dropout: float = 0.0,
        output: dict | None = None,
        num_classes: int = 0,
    ):
        super().__init__()
        for key, value, low in (("num_filters", num_filters, 1), ("num_resnet", num_resnet, 1),
                                ("num_stages", num_stages, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"model.net.{key} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.net.dropout must be in [0, 1), got {dropout!r}")
        self.num_channels = num_channels
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.distribution = build_distribution(output, num_channels, num_levels)
        f, c = num_filters, num_channels

        def blocks(conv, aux: int, count: int) -> nn.ModuleList:
            return nn.ModuleList(GatedResNet(f, conv, aux, dropout, num_classes) for _ in range(count))

        self.u_init = down_shifted(c + 1, f)  # input: the image in [-1, 1] and a channel of ones
        self.ul_init_above = ShiftedConv2d(c + 1, f, (1, 3), left=1)
        self.ul_init_left = ShiftedConv2d(c + 1, f, (2, 1), left=0)
        self.up_u = nn.ModuleList(blocks(down_shifted, 0, num_resnet) for _ in range(num_stages))
        self.up_ul = nn.ModuleList(blocks(down_right_shifted, f, num_resnet) for _ in range(num_stages))
        self.downsample_u = nn.ModuleList(down_shifted(f, f, 2) for _ in range(num_stages - 1))
        self.downsample_ul = nn.ModuleList(down_right_shifted(f, f, 2) for _ in range(num_stages - 1))
        down_counts = [num_resnet + (s < num_stages - 1) for s in range(num_stages)]
        self.down_u = nn.ModuleList(blocks(down_shifted, f, n) for n in down_counts)
        self.down_ul = nn.ModuleList(blocks(down_right_shifted, 2 * f, n) for n in down_counts)
        self.upsample_u = nn.ModuleList(down_shifted_upsample(f) for _ in range(num_stages - 1))
        self.upsample_ul = nn.ModuleList(down_right_shifted_upsample(f) for _ in range(num_stages - 1))
        self.pixel_head = c > 1 and not getattr(self.distribution, "reads_earlier_colours", False)
        if self.pixel_head:
            self.head_features = nn.Conv2d(f, f, 1)
            self.head_pixel = MaskedConv2d(c, f, 1, "A", c, bias=False)
            self.head = OutputLayers(f, f, c, self.distribution, num_layers=2)
        else:
            self.head = nn.Conv2d(f, self.distribution.num_params, 1)

    def check_size(self, height: int, width: int) -> None:
        factor = 2 ** (self.num_stages - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"pixelcnn_pp with num_stages={self.num_stages} needs image height and width divisible by "
                f"2 ** (num_stages - 1) = {factor}, got {height}x{width}; change data.image_size or "
                f"model.net.num_stages"
            )

    def check_image_size(self, image_size: int) -> None:
        """Called by the LightningModule with the data's image size, before any training."""
        self.check_size(image_size, image_size)

    def output_params(self, ul: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The distribution's parameters from the last ul features and the image y in [-1, 1]."""
        if self.pixel_head:
            return self.head(self.head_features(F.elu(ul)) + self.head_pixel(y))
        return self.head(F.elu(ul))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> the distribution's parameters (B, P, H, W)."""
        check_input(x, self.num_channels)
        self.check_size(*x.shape[2:])
        index = class_index(label, len(x), self.num_classes, x.device)
        y = 2 * x - 1
        xp = torch.cat([y, torch.ones_like(y[:, :1])], 1)
        us = [down_shift(self.u_init(xp))]
        uls = [down_shift(self.ul_init_above(xp)) + right_shift(self.ul_init_left(xp))]
        for s in range(self.num_stages):
            if s > 0:
                us.append(self.downsample_u[s - 1](us[-1]))
                uls.append(self.downsample_ul[s - 1](uls[-1]))
            for block_u, block_ul in zip(self.up_u[s], self.up_ul[s], strict=True):
                us.append(block_u(us[-1], None, index))
                uls.append(block_ul(uls[-1], us[-1], index))
        u, ul = us.pop(), uls.pop()
        for s in reversed(range(self.num_stages)):
            if s < self.num_stages - 1:
                u, ul = self.upsample_u[s](u), self.upsample_ul[s](ul)
            for block_u, block_ul in zip(self.down_u[s], self.down_ul[s], strict=True):
                u = block_u(u, us.pop(), index)
                ul = block_ul(ul, torch.cat([u, uls.pop()], 1), index)
        return self.output_params(ul, y)

    def cached_stepper(self, label: torch.Tensor | None = None) -> "CachedPixelCNNPPStepper":
        return CachedPixelCNNPPStepper(self, label)


# ----------------------------------------------------------------------------------------------------
# Cached sampling


class Rows:
    """The two latest rows of one layer's output map at one stage, channels last and zero padded one
    column on each side: (B, 2, W + 2, F); row 0 is the previous row (zeros above the image), row 1 the
    current one. Everything a shifted convolution reads at the current row is in these two rows."""

    def __init__(self, batch: int, width: int, features: int, like: torch.Tensor):
        self.data = like.new_zeros(batch, 2, width + 2, features)
        self.width = width

    def next_row(self) -> None:
        self.data[:, 0] = self.data[:, 1]
        self.data[:, 1] = 0

    def set_row(self, values: torch.Tensor) -> None:
        """values: (B, W, F)."""
        self.data[:, 1, 1 : self.width + 1] = values

    def set(self, col: int, values: torch.Tensor) -> None:
        """values: (B, F) at column ``col`` of the current row."""
        self.data[:, 1, col + 1] = values

    def row(self) -> torch.Tensor:
        return self.data[:, 1, 1 : self.width + 1]

    def at(self, col: int) -> torch.Tensor:
        return self.data[:, 1, col + 1]


class ShiftedConvAt:
    """A ``ShiftedConv2d`` on ``Rows``: its output for the whole current row (one conv2d over two rows),
    or at one column (one matrix product over the kh x kw window), optionally on concat_elu of the input."""

    def __init__(self, conv: ShiftedConv2d):
        self.kh, self.kw = conv.kernel_size
        self.left, self.stride = conv.left, conv.stride[1]
        self.weight = conv.weight.detach().clone()
        self.bias = conv.bias.detach().clone()
        self.matrix = self.weight.permute(0, 2, 3, 1).reshape(len(self.weight), -1).t()

    def window(self, rows: Rows, first_col: int, num_cols: int, elu: bool) -> torch.Tensor:
        start = first_col + 1 - self.left  # padded column of the window's left edge
        w = rows.data[:, 2 - self.kh :, start : start + num_cols]
        return concat_elu(w, -1) if elu else w

    def row(self, rows: Rows, out_width: int, elu: bool = False) -> torch.Tensor:
        """(B, W_out, F_out) for the current row."""
        w = self.window(rows, 0, (out_width - 1) * self.stride + self.kw, elu)
        out = F.conv2d(w.permute(0, 3, 1, 2), self.weight, self.bias, stride=(1, self.stride))
        return out[:, :, 0].transpose(1, 2)

    def at(self, rows: Rows, col: int, elu: bool = False) -> torch.Tensor:
        """(B, F_out) at output column ``col`` of the current row."""
        w = self.window(rows, col * self.stride, self.kw, elu)
        return torch.addmm(self.bias, w.reshape(len(w), -1), self.matrix)


class LinearAt:
    """A 1x1 convolution (B, ..., F_in) -> (B, ..., F_out), channels last."""

    def __init__(self, conv: nn.Conv2d):
        self.weight = conv.weight.detach().flatten(1).clone()
        self.bias = None if conv.bias is None else conv.bias.detach().clone()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class GatedResNetAt:
    """A ``GatedResNet`` on ``Rows``: caches its hidden map (the second convolution's input) and output."""

    def __init__(self, block: GatedResNet):
        self.conv_in = ShiftedConvAt(block.conv_in)
        self.conv_out = ShiftedConvAt(block.conv_out)
        self.aux = None if block.aux is None else LinearAt(block.aux)
        self.class_bias_table = block.class_bias
        self.bias = None
        self.hidden: Rows | None = None
        self.out: Rows | None = None

    def reset(self, batch: int, width: int, features: int, like, index) -> None:
        self.hidden = Rows(batch, width, features, like)
        self.out = Rows(batch, width, features, like)
        self.bias = None if self.class_bias_table is None else self.class_bias_table(index).detach()

    def next_row(self) -> None:
        self.hidden.next_row()
        self.out.next_row()

    def _gate(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            gates = gates + (self.bias[:, None] if gates.dim() == 3 else self.bias)
        a, b = gates.chunk(2, -1)
        return x + a * torch.sigmoid(b)

    def row(self, x: Rows, aux: torch.Tensor | None) -> None:
        """The whole current row, from the input's rows and the aux features (B, W, F_aux) there."""
        h = self.conv_in.row(x, x.width, elu=True)
        if self.aux is not None:
            h = h + self.aux(concat_elu(aux, -1))
        self.hidden.set_row(h)
        self.out.set_row(self._gate(x.row(), self.conv_out.row(self.hidden, x.width, elu=True)))

    def at(self, x: Rows, col: int, aux: torch.Tensor) -> None:
        """Column ``col`` of the current row, from the input's rows and the aux features (B, F_aux) there."""
        h = self.conv_in.at(x, col, elu=True) + self.aux(concat_elu(aux, -1))
        self.hidden.set(col, h)
        self.out.set(col, self._gate(x.at(col), self.conv_out.at(self.hidden, col, elu=True)))


class CachedPixelCNNPPStepper:
    """Output parameters at one pixel at a time, from caches of every layer at every stage.

    Which features are final when: the u stream at row i of the full image depends on image rows < i
    only, and never on ul; the ul stream at (i, j) on the pixels before (i, j) in raster order. At stage s
    (2 ** s smaller), row r of u depends on image rows < 2 ** s * r, and (r, c) of ul on the pixels before
    (2 ** s * r, 2 ** s * c). Every convolution reads the current and the previous row of its input
    (shifted kernels have two rows; the stride-2 ones read rows 2r - 1, 2r of the larger stage; the
    upsampling ones row r // 2 of the smaller), so each layer keeps only those two rows (``Rows``).

    At the first colour of each pixel (i, j), for every stage s with 2 ** s dividing i (and j):
    - at a new row (j = 0): the u stream's whole row r = i / 2 ** s, for every layer of the up pass
      (stages in increasing order) and of the down pass (decreasing): one convolution over two rows per
      layer, once per row instead of once per pixel;
    - the ul stream at (i / 2 ** s, j / 2 ** s): one matrix product per convolution on the 2x2 window.
    Then the output layer at (i, j). The parameters do not depend on the pixel's own colours (nothing of
    the pixel is seen), so the steps for G and B reuse them; with the masked head (categorical, C > 1)
    only the head runs again with the pixel's earlier colours. Per image: about one network pass for the
    u stream and H * W one-position passes for ul, instead of H * W * C full passes.

    Calls must come in raster order (R, G, B of each pixel, pixels row by row), as ``generate`` makes
    them; the caches start over at (0, 0, colour 0). The weights are copied when the stepper is made.
    """

    def __init__(self, net: PixelCNNPP, label: torch.Tensor | None = None):
        self.net = net
        self.label = label
        self.num_stages = net.num_stages
        self.features = net.u_init.out_channels
        self.u_init = ShiftedConvAt(net.u_init)
        self.ul_init_above = ShiftedConvAt(net.ul_init_above)
        self.ul_init_left = ShiftedConvAt(net.ul_init_left)
        self.up_u = [[GatedResNetAt(b) for b in stage] for stage in net.up_u]
        self.up_ul = [[GatedResNetAt(b) for b in stage] for stage in net.up_ul]
        self.down_u = [[GatedResNetAt(b) for b in stage] for stage in net.down_u]
        self.down_ul = [[GatedResNetAt(b) for b in stage] for stage in net.down_ul]
        self.downsample_u = [ShiftedConvAt(conv) for conv in net.downsample_u]
        self.downsample_ul = [ShiftedConvAt(conv) for conv in net.downsample_ul]
        self.upsample_u = [
            (conv.weight.detach().clone(), conv.bias.detach().clone()) for conv in net.upsample_u
        ]
        self.upsample_ul = [
            (conv.weight.detach().clone(), conv.bias.detach().clone()) for conv in net.upsample_ul
        ]
        self.pixel_head = net.pixel_head
        if self.pixel_head:
            self.head_features = LinearAt(net.head_features)
            self.head_pixel = net.head_pixel.at_position()
            self.head = net.head.at_position()
        else:
            self.head = LinearAt(net.head)
        self.features_at: torch.Tensor | None = None
        self.params_at: torch.Tensor | None = None

    def _reset(self, x: torch.Tensor) -> None:
        batch, channels, height, width = x.shape
        self.net.check_size(height, width)
        f = self.features
        index = class_index(self.label, batch, self.net.num_classes, x.device)
        # The image in [-1, 1] plus the ones channel, zero padded one row above and a column each side.
        self.image = x.new_zeros(batch, height + 1, width + 2, channels + 1)
        self.image[:, 1:, 1 : width + 1, channels] = 1
        self.image_rows = Rows(batch, width, channels + 1, x)
        self.widths = [width >> s for s in range(self.num_stages)]

        def maps(stage: int) -> Rows:
            return Rows(batch, self.widths[stage], f, x)

        # Per stage: the input of its first block in each pass (the stage's first map), then the blocks.
        self.up_u_in = [maps(s) for s in range(self.num_stages)]
        self.up_ul_in = [maps(s) for s in range(self.num_stages)]
        self.down_u_in = [maps(s) for s in range(self.num_stages - 1)]
        self.down_ul_in = [maps(s) for s in range(self.num_stages - 1)]
        for s in range(self.num_stages):
            for block in self.up_u[s] + self.up_ul[s] + self.down_u[s] + self.down_ul[s]:
                block.reset(batch, self.widths[s], f, x, index)
        self.ul_above_row: torch.Tensor | None = None

    def _stage_rows(self, s: int) -> list[Rows]:
        rows = [self.up_u_in[s], self.up_ul_in[s]]
        if s < self.num_stages - 1:
            rows += [self.down_u_in[s], self.down_ul_in[s]]
        for block in self.up_u[s] + self.up_ul[s] + self.down_u[s] + self.down_ul[s]:
            rows += [block.hidden, block.out]
        return rows

    def _write_image(self, x: torch.Tensor, i: int) -> None:
        first = max(0, i - 2)
        self.image[:, first + 1 : i + 2, 1:-1, :-1] = (2 * x[:, :, first : i + 1] - 1).permute(0, 2, 3, 1)

    def _image_rows(self, last: int) -> Rows:
        """Image rows ``last - 1`` and ``last`` (zeros above the image) as ``Rows``."""
        self.image_rows.data = self.image[:, last : last + 2]
        return self.image_rows

    def _u_rows(self, i: int, stages: list[int]) -> None:
        """The u stream's current rows at ``stages`` (those where row i starts a row)."""
        # u_init: down_shift(conv(image)) reads image rows i - 2, i - 1.
        if i == 0:
            self.up_u_in[0].set_row(0)
            self.ul_above_row = None
        else:
            self.up_u_in[0].set_row(self.u_init.row(self._image_rows(i - 1), self.widths[0]))
            self.ul_above_row = self.ul_init_above.row(self._image_rows(i - 1), self.widths[0])
        pushed = []  # up-pass maps in the order the forward pass pushes them (its shortcut stack)
        for s in range(self.num_stages):
            if s > 0:
                first = self.up_u_in[s]
                if s in stages:
                    first.set_row(self.downsample_u[s - 1].row(pushed[-1], self.widths[s]))
            pushed.append(self.up_u_in[s])
            for block in self.up_u[s]:
                if s in stages:
                    block.row(pushed[-1], None)
                pushed.append(block.out)
        u = pushed.pop()
        for s in reversed(range(self.num_stages)):
            if s < self.num_stages - 1:
                if s in stages:
                    weight, bias = self.upsample_u[s]
                    low = u.row().permute(0, 2, 1)[
                        :, :, None
                    ]  # (B, F, 1, W_low): row (r // 2) of stage s + 1
                    r = i >> s
                    up = F.conv_transpose2d(
                        low,
                        weight[:, :, r % 2 : r % 2 + 1],
                        bias,
                        stride=(1, 2),
                        padding=(0, 1),
                        output_padding=(0, 1),
                    )
                    self.down_u_in[s].set_row(up[:, :, 0].transpose(1, 2))
                u = self.down_u_in[s]
            for block in self.down_u[s]:
                shortcut = pushed.pop()
                if s in stages:
                    block.row(u, shortcut.row())
                u = block.out

    def _ul_at(self, i: int, j: int, stages: list[int]) -> torch.Tensor:
        """The ul stream at (i >> s, j >> s) for ``stages``; returns the last ul features at (i, j)."""
        first = self.up_ul_in[0]
        first.set(j, 0)
        if self.ul_above_row is not None:  # down_shift(conv 1x3 of image row i - 1)
            first.set(j, self.ul_above_row[:, j])
        if j > 0:  # right_shift(conv 2x1 of image rows i - 1, i): column j - 1
            first.set(j, first.at(j) + self.ul_init_left.at(self._image_rows(i), j - 1))
        pushed = []  # up-pass ul maps in the order the forward pass pushes them
        for s in range(self.num_stages):
            c = j >> s
            if s > 0 and s in stages:
                self.up_ul_in[s].set(c, self.downsample_ul[s - 1].at(pushed[-1], c))
            pushed.append(self.up_ul_in[s])
            for block_u, block_ul in zip(self.up_u[s], self.up_ul[s], strict=True):
                if s in stages:
                    block_ul.at(pushed[-1], c, block_u.out.at(c))
                pushed.append(block_ul.out)
        ul = pushed.pop()
        for s in reversed(range(self.num_stages)):
            c = j >> s
            if s < self.num_stages - 1:
                if s in stages:
                    weight, bias = self.upsample_ul[s]
                    r = i >> s
                    self.down_ul_in[s].set(c, torch.addmm(bias, ul.at(c >> 1), weight[:, :, r % 2, c % 2]))
                ul = self.down_ul_in[s]
            for block_u, block_ul in zip(self.down_u[s], self.down_ul[s], strict=True):
                shortcut = pushed.pop()
                if s in stages:
                    block_ul.at(ul, c, torch.cat([block_u.out.at(c), shortcut.at(c)], -1))
                ul = block_ul.out
        return ul.at(j)

    def _head(self, pixel: torch.Tensor) -> torch.Tensor:
        if self.pixel_head:
            return self.head(self.head_features(self.features_at) + self.head_pixel(2 * pixel - 1))
        return self.head(self.features_at)

    def params(self, x: torch.Tensor, i: int, j: int, c: int) -> torch.Tensor:
        """The distribution's parameters (B, P) at pixel (i, j) for colour c's step, given the image ``x``
        (B, C, H, W) generated so far."""
        if (i, j, c) == (0, 0, 0):
            self._reset(x)
        if c == 0:
            self._write_image(x, i)
            stages = [s for s in range(self.num_stages) if i % (1 << s) == 0 and j % (1 << s) == 0]
            if j == 0:
                for s in stages:
                    for rows in self._stage_rows(s):
                        rows.next_row()
                self._u_rows(i, stages)
            self.features_at = F.elu(self._ul_at(i, j, stages))
            self.params_at = self._head(x[:, :, i, j])
        elif self.pixel_head:
            self.params_at = self._head(x[:, :, i, j])
        return self.params_at
