"""The contract every registered architecture keeps, with every output distribution, checked over the
registries (``ARCHITECTURES`` x ``DISTRIBUTIONS``), so that no future architecture can skip it:

- causal by gradients for C=1 and C=3, in train and eval mode, unconditional and class-conditional (the
  label free to influence every sub-pixel);
- runs at any (supported) size, returning (B, K, C, H, W) logits;
- cached sampling gives exactly the naive sampler's images (float64), also with a label and in completion;
- a checkpoint round trip through ``weights_only=True`` loading gives the same outputs;
- a ``conf/model/<name>.yaml`` composes to it.

A new architecture needs an entry in ``ARCHITECTURE_SETTINGS`` (its small test network); the first test
fails until it has one. Architecture-specific tests (the Row LSTM's triangle, skew / unskew, reference
recurrences) stay in the architecture's own test file.
"""

import pytest
import torch
from causality import assert_causal, logits_of
from helpers import ROOT, compose_train

from pixel_models.architectures import ARCHITECTURES
from pixel_models.blocks.layers import FirstLayer, OutputLayers, check_input
from pixel_models.distributions import DISTRIBUTIONS, build_distribution
from pixel_models.sampling.generate import NaiveStepper, generate
from pixel_models.training.checkpoint import load_module
from pixel_models.training.module import AutoregressiveModule

# Small networks of every registered architecture. Output layers of 48 maps (16 per colour group): with
# only a few ReLUs per group, all of them can be off for a whole batch at some pixel, and the same-pixel
# colour dependence the check demands would vanish.
ARCHITECTURE_SETTINGS = {
    "pixelcnn": {"net": {"hidden": 12, "num_layers": 2, "output_hidden": 48}},
    "row_lstm": {"net": {"hidden": 12, "num_layers": 2, "output_hidden": 48}},
    "diag_bilstm": {"net": {"hidden": 12, "num_layers": 2, "output_hidden": 48}},
    # Subsampling by 2: the small image is every other pixel of every other row.
    "multiscale": {
        "net": {
            "base": "row_lstm",
            "image_size": 4,
            "small_size": 2,
            "hidden": 12,
            "num_layers": 2,
            "output_hidden": 48,
        },
        "sizes": [(4, 4), (4, 6), (6, 8), (2, 2)],
        "causal_size": (4, 6),
    },
    "gated_pixelcnn": {"net": {"hidden": 12, "num_layers": 2, "output_hidden": 48}},
    # Three stages (two down- and upsamplings), so sizes are multiples of 4; the first is not square.
    "pixelcnn_pp": {
        "net": {"num_filters": 12, "num_resnet": 1, "num_stages": 3},
        "sizes": [(4, 8), (4, 4), (8, 4), (12, 8)],
        "causal_size": (4, 8),
    },
}
# Each architecture may name sizes it supports (default below) and output distributions / channel counts it
# refuses, with the message it must refuse them with.
DEFAULT_SIZES = [(5, 5), (4, 6), (7, 11), (9, 2), (1, 1)]

DISTRIBUTION_SETTINGS = {
    "categorical": {"name": "categorical"},
    "logistic_mixture": {"name": "logistic_mixture", "num_mixtures": 3},
}
NUM_LEVELS = 4
NUM_CLASSES = 3


def combinations():
    for arch in ARCHITECTURE_SETTINGS:
        for dist in DISTRIBUTION_SETTINGS:
            for channels in (1, 3):
                refused = ARCHITECTURE_SETTINGS[arch].get("refuses", {}).get((dist, channels))
                yield pytest.param(arch, dist, channels, refused, id=f"{arch}-{dist}-C{channels}")


def small_net(arch: str, dist: str, channels: int, num_classes: int = 0, settings=None):
    torch.manual_seed(0)
    settings = settings or ARCHITECTURE_SETTINGS[arch]
    net_class = settings.get("class") or ARCHITECTURES[arch]
    return net_class(
        num_channels=channels,
        num_levels=NUM_LEVELS,
        output=DISTRIBUTION_SETTINGS[dist],
        num_classes=num_classes,
        **settings["net"],
    )


def causal_size(arch: str) -> tuple[int, int]:
    return ARCHITECTURE_SETTINGS[arch].get("causal_size", (5, 5))


def sizes_of(arch: str, settings=None) -> list[tuple[int, int]]:
    return (settings or ARCHITECTURE_SETTINGS[arch]).get("sizes", DEFAULT_SIZES)


# ----------------------------------------------------------------------------------------------------
# The registries are covered


def test_every_registered_architecture_has_contract_settings():
    missing = sorted(set(ARCHITECTURES) - set(ARCHITECTURE_SETTINGS))
    assert not missing, f"add {missing} to ARCHITECTURE_SETTINGS in tests/test_contract.py"


def test_every_registered_distribution_has_contract_settings():
    missing = sorted(set(DISTRIBUTIONS) - set(DISTRIBUTION_SETTINGS))
    assert not missing, f"add {missing} to DISTRIBUTION_SETTINGS in tests/test_contract.py"


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_has_a_model_config(arch):
    assert (ROOT / "conf" / "model" / f"{arch}.yaml").is_file(), f"add conf/model/{arch}.yaml"
    cfg = compose_train(f"model={arch}")
    assert cfg.model.net.arch == arch
    assert cfg.model._target_ == "pixel_models.training.module.AutoregressiveModule"


# ----------------------------------------------------------------------------------------------------
# The checks, as functions, so that a test can run them on an architecture it registers itself


def check_causal(net, channels: int, train_mode: bool, label=None, size=(5, 5)) -> None:
    net.train(train_mode)
    if label is None:
        assert_causal(net, channels, *size)
    else:
        assert_causal(_WithLabel(net, label), channels, *size)


class _WithLabel(torch.nn.Module):
    """The network with a fixed label, for the gradient check (which calls ``net(x)``)."""

    def __init__(self, net, label):
        super().__init__()
        self.net, self.label, self.distribution = net, label, net.distribution
        if hasattr(net, "generation_order"):
            self.generation_order = net.generation_order

    def forward(self, x):
        label = self.label.expand(len(x)) if self.label.numel() == 1 else self.label
        return self.net(x, label)


def check_label_reaches_every_subpixel(net, channels: int, size=(4, 6)) -> None:
    net = net.double().eval()
    x = torch.rand(2, channels, *size, dtype=torch.float64)
    with torch.no_grad():
        outputs = [logits_of(net, x, torch.full((2,), c, dtype=torch.long)) for c in range(NUM_CLASSES)]
        unconditional = logits_of(net, x)
    for other in [*outputs[1:], unconditional]:
        changed = (other - outputs[0]).abs().amax(dim=1)  # (B, C, H, W)
        assert (changed > 0).all(), "the label must be able to move every sub-pixel's distribution"


def check_any_size(net, channels: int, sizes) -> None:
    net.eval()
    for height, width in sizes:
        logits = logits_of(net, torch.rand(2, channels, height, width))
        assert logits.shape == (2, NUM_LEVELS, channels, height, width)
        assert torch.isfinite(logits).all()


def check_cached_equals_naive(net, channels: int, size, label=None) -> None:
    net = net.double().eval()
    height, width = size
    noise = torch.rand(3, channels, height, width, generator=torch.Generator().manual_seed(1))
    for temperature in (1.0, 0.7):
        naive = generate(net, noise, NUM_LEVELS, temperature, "naive", label=label)
        cached = generate(net, noise, NUM_LEVELS, temperature, "cached", label=label)
        assert torch.equal(cached, naive)
        assert len(naive.unique()) > 1  # the check means something only if samples vary
    # Completion: the known top half is kept, and both samplers agree on the rest.
    known = torch.randint(0, NUM_LEVELS, noise.shape)
    known_mask = torch.zeros(noise.shape, dtype=torch.bool)
    known_mask[:, :, : height // 2] = True
    naive = generate(net, noise, NUM_LEVELS, 0.8, "naive", known, known_mask, label=label)
    cached = generate(net, noise, NUM_LEVELS, 0.8, "cached", known, known_mask, label=label)
    assert torch.equal(cached, naive)
    assert torch.equal(cached[known_mask], known[known_mask])


def check_checkpoint_round_trip(tmp_path, arch: str, dist: str, channels: int, conditional: bool) -> None:
    torch.manual_seed(0)
    module = AutoregressiveModule(
        {"arch": arch, **ARCHITECTURE_SETTINGS[arch]["net"]},
        num_channels=channels,
        num_levels=NUM_LEVELS,
        image_size=sizes_of(arch)[0][0],
        output=DISTRIBUTION_SETTINGS[dist],
        conditional=conditional,
        num_classes=NUM_CLASSES,
    ).eval()
    path = tmp_path / f"{arch}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loaded = load_module(path)  # weights_only=True
    size = sizes_of(arch)[0][0]
    x = torch.rand(2, channels, size, size)
    label = torch.tensor([0, NUM_CLASSES - 1]) if conditional else None
    with torch.no_grad():
        assert torch.equal(loaded(x, label), module(x, label))
    assert type(loaded.distribution) is type(module.distribution)


# ----------------------------------------------------------------------------------------------------
# ... over the registries


def skip_refused(arch, dist, channels, refused):
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            small_net(arch, dist, channels)
        pytest.skip(f"{arch} refuses {dist} with C={channels}, as it must")


@pytest.mark.parametrize("arch, dist, channels, refused", combinations())
@pytest.mark.parametrize("train_mode", [True, False])
def test_causal(arch, dist, channels, refused, train_mode):
    skip_refused(arch, dist, channels, refused)
    check_causal(small_net(arch, dist, channels), channels, train_mode, size=causal_size(arch))


@pytest.mark.parametrize("arch, dist, channels, refused", combinations())
def test_conditional_is_causal_in_the_image_and_the_label_reaches_every_subpixel(
    arch, dist, channels, refused
):
    skip_refused(arch, dist, channels, refused)
    net = small_net(arch, dist, channels, num_classes=NUM_CLASSES)
    check_causal(net, channels, train_mode=True, label=torch.tensor([1]), size=causal_size(arch))
    check_label_reaches_every_subpixel(net, channels, sizes_of(arch)[1])


@pytest.mark.parametrize("arch, dist, channels, refused", combinations())
def test_runs_at_any_size(arch, dist, channels, refused):
    skip_refused(arch, dist, channels, refused)
    check_any_size(small_net(arch, dist, channels), channels, sizes_of(arch))


@pytest.mark.parametrize("arch, dist, channels, refused", combinations())
@pytest.mark.parametrize("conditional", [False, True])
def test_cached_sampling_equals_naive(arch, dist, channels, refused, conditional):
    skip_refused(arch, dist, channels, refused)
    net = small_net(arch, dist, channels, num_classes=NUM_CLASSES if conditional else 0)
    label = torch.tensor([0, 2, NUM_CLASSES]) if conditional else None  # NUM_CLASSES: "no label"
    size = [s for s in sizes_of(arch) if min(s) > 2][0]
    check_cached_equals_naive(net, channels, size, label)


@pytest.mark.parametrize("arch, dist, channels, refused", combinations())
@pytest.mark.parametrize("conditional", [False, True])
def test_checkpoint_round_trip_with_weights_only(tmp_path, arch, dist, channels, refused, conditional):
    skip_refused(arch, dist, channels, refused)
    check_checkpoint_round_trip(tmp_path, arch, dist, channels, conditional)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_SETTINGS))
def test_wrong_channel_count_and_an_unconditional_label_are_clear_errors(arch):
    net = small_net(arch, "categorical", 3)
    with pytest.raises(ValueError, match="num_channels"):
        net(torch.rand(2, 1, *sizes_of(arch)[0]))
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.rand(2, 3, *sizes_of(arch)[0]), torch.tensor([0, 1]))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURE_SETTINGS))
def test_torch_compile_traces_the_network_and_changes_no_value(arch):
    """``compile=true`` must work for every network: dynamo and AOT autograd trace it (the "aot_eager"
    backend runs the traced graphs without generating code, so this stays quick), and the logits and
    every parameter's gradient equal the eager ones. Eval mode: dropout draws differ when traced."""
    torch._dynamo.reset()
    net = small_net(arch, "categorical", 3).double().eval()
    x = torch.rand(2, 3, *sizes_of(arch)[0], dtype=torch.float64)

    def logits_and_grads(module):
        net.zero_grad(set_to_none=True)
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    eager, eager_grads = logits_and_grads(net)
    traced, traced_grads = logits_and_grads(torch.compile(net, backend="aot_eager", dynamic=False))
    torch.testing.assert_close(traced, eager)
    for g_traced, g_eager in zip(traced_grads, eager_grads, strict=True):
        torch.testing.assert_close(g_traced, g_eager)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# A new architecture is one file plus a registry entry, then the contract checks it


class ToyMaskedNetwork(torch.nn.Module):
    """The smallest architecture: the 7x7 mask-A first layer straight into the output layers. Its "cached"
    sampler is the naive one, which the contract accepts (it is equal by construction)."""

    def __init__(self, num_channels, num_levels, hidden=8, output=None, num_classes=0):
        super().__init__()
        self.num_channels, self.num_classes = num_channels, num_classes
        self.distribution = build_distribution(output, num_channels, num_levels)
        self.first = FirstLayer(num_channels, 2 * hidden)
        self.output = OutputLayers(2 * hidden, 48, num_channels, self.distribution)
        self.class_bias = torch.nn.Embedding(num_classes + 1, 2 * hidden) if num_classes else None

    def forward(self, x, label=None):
        check_input(x, self.num_channels)
        h = self.first(x)
        if self.class_bias is not None:
            if label is None:
                label = torch.full((len(x),), self.num_classes, dtype=torch.long)
            h = h + self.class_bias(label)[:, :, None, None]
        elif label is not None:
            raise ValueError("this model is unconditional")
        return self.output(h)

    def cached_stepper(self, label=None):
        return NaiveStepper(self, label)


def test_a_new_registered_architecture_is_checked_by_the_contract(monkeypatch, tmp_path):
    monkeypatch.setitem(ARCHITECTURES, "toy", ToyMaskedNetwork)
    with pytest.raises(AssertionError, match="toy"):
        test_every_registered_architecture_has_contract_settings()
    settings = {"class": ToyMaskedNetwork, "net": {"hidden": 8}}
    monkeypatch.setitem(ARCHITECTURE_SETTINGS, "toy", settings)
    test_every_registered_architecture_has_contract_settings()
    for channels in (1, 3):
        for train_mode in (True, False):
            check_causal(small_net("toy", "categorical", channels), channels, train_mode)
        check_any_size(small_net("toy", "categorical", channels), channels, DEFAULT_SIZES)
        check_cached_equals_naive(small_net("toy", "categorical", channels), channels, (4, 5))
        conditional = small_net("toy", "categorical", channels, num_classes=NUM_CLASSES)
        check_label_reaches_every_subpixel(conditional, channels)
    check_checkpoint_round_trip(tmp_path, "toy", "categorical", 3, conditional=False)


def test_a_leaking_architecture_fails_the_contract():
    """The gradient check catches a network that reads its own pixel (mask B in the first layer)."""

    class Leaky(ToyMaskedNetwork):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.first.mask[:, :, 3, 3] = 1  # the centre pixel, every colour

    torch.manual_seed(0)
    net = Leaky(1, NUM_LEVELS)
    with pytest.raises(AssertionError, match="future inputs reach outputs"):
        check_causal(net, 1, train_mode=False)
