"""Gradient check of the autoregressive order, shared by the architecture tests.

For every output sub-pixel (c, i, j) the gradient of its logits w.r.t. the input image is taken; it
must vanish on every input sub-pixel that is not before it (a later pixel in raster order, the same
pixel's own or later colours).
"""

import torch


def logits_of(net, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, K, C, H, W) logits of the contract: a LightningModule gives them, a network gives its output
    distribution's parameters, turned into them by ``net.distribution.log_probs``."""
    out = net(x) if label is None else net(x, label)
    return out if out.dim() == 5 else net.distribution.log_probs(out, x)


def input_gradients(net, num_channels: int, height: int, width: int, batch: int = 8) -> torch.Tensor:
    """|d logits[:, :, c, i, j] / d x| summed over batch and levels: (C, H, W, C, H, W), output first."""
    torch.manual_seed(0)
    x = torch.rand(batch, num_channels, height, width, dtype=torch.float64, requires_grad=True)
    logits = logits_of(net, x)
    grads = torch.zeros(num_channels, height, width, num_channels, height, width, dtype=torch.float64)
    for c in range(num_channels):
        for i in range(height):
            for j in range(width):
                (g,) = torch.autograd.grad(logits[:, :, c, i, j].sum(), x, retain_graph=True)
                grads[c, i, j] = g.abs().sum(0)
    return grads


def layer_input_gradients(layer, height: int, width: int, batch: int = 4, image_channels: int = 0):
    """|d output(i, j) / d input(i', j')| of one recurrent layer, summed over batch and feature maps:
    (H, W, H, W). The input has the layer's 2 * hidden maps; ``image_channels`` > 0: the layer also reads
    an image of that many channels (the Diagonal BiLSTM layer's right-to-left gates), a random one."""
    layer = layer.double()
    x = torch.randn(batch, 2 * layer.hidden, height, width, dtype=torch.float64, requires_grad=True)
    image = torch.rand(batch, image_channels, height, width, dtype=torch.float64) if image_channels else None
    out = layer(x) if image is None else layer(x, image)
    grads = torch.zeros(height, width, height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            (g,) = torch.autograd.grad(out[:, :, i, j].sum(), x, retain_graph=True)
            grads[i, j] = g.abs().sum((0, 1))
    return grads


def allowed_inputs(
    num_channels: int, height: int, width: int, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (C, H, W, C, H, W): True where input (c', i', j') comes before output (c, i, j).

    ``order``: each pixel's rank (H, W) in the model's generation order; None: raster order."""
    pixel = torch.arange(height * width).view(height, width) if order is None else order
    earlier_pixel = pixel[None, :, :, None, None, None] > pixel[None, None, None, None, :, :]
    same_pixel = pixel[None, :, :, None, None, None] == pixel[None, None, None, None, :, :]
    colour = torch.arange(num_channels)
    earlier_colour = colour[:, None, None, None, None, None] > colour[None, None, None, :, None, None]
    return earlier_pixel | (same_pixel & earlier_colour)


def assert_causal(net, num_channels: int, height: int = 5, width: int = 5) -> torch.Tensor:
    """Assert no gradient flows from the future (in the network's ``generation_order`` where it has one,
    else raster order); returns the gradients for further checks."""
    grads = input_gradients(net.double(), num_channels, height, width)
    order = net.generation_order(height, width) if hasattr(net, "generation_order") else None
    leaks = (grads > 0) & ~allowed_inputs(num_channels, height, width, order)
    assert not leaks.any(), (
        f"future inputs reach outputs at (c, i, j, c', i', j') = {leaks.nonzero()[:5].tolist()}"
    )
    # Within a pixel, every later colour must actually read the earlier ones (G from R, B from R and G).
    for c in range(num_channels):
        for earlier in range(c):
            assert (grads[c, :, :, earlier].diagonal(dim1=0, dim2=2).diagonal(dim1=0, dim2=1) > 0).all(), (
                f"colour {c} does not depend on colour {earlier} of the same pixel"
            )
    return grads
