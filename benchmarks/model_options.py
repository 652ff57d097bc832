"""What sampling.py and train_throughput.py share: the architectures they time by default, the options
that set the networks' widths, and the config overrides those options stand for."""

import argparse

MODELS = ["pixelcnn", "row_lstm", "diag_bilstm", "gated_pixelcnn", "pixelcnn_pp"]


def add_width_options(parser: argparse.ArgumentParser, hidden_default: str) -> None:
    """--cifar-hidden / --cifar-output (at CIFAR-10 shapes; ``hidden_default`` says what h is without
    them) and --pp-filters / --pp-resnet (PixelCNN++, whose net has neither)."""
    parser.add_argument(
        "--cifar-hidden", type=int, default=None, help=f"h at CIFAR-10 shapes (default: {hidden_default})"
    )
    parser.add_argument("--cifar-output", type=int, default=None, help="output maps at CIFAR-10 shapes")
    parser.add_argument("--pp-filters", type=int, default=None, help="PixelCNN++ filters (default: config's)")
    parser.add_argument("--pp-resnet", type=int, default=None, help="PixelCNN++ blocks per stage")


def width_overrides(model: str, data: str, args: argparse.Namespace) -> list[str]:
    """The config overrides of the width options for ``model`` at ``data``'s shapes."""
    overrides = []
    if model == "pixelcnn_pp":  # its net has no hidden / output_hidden
        if args.pp_filters:
            overrides.append(f"model.net.num_filters={args.pp_filters}")
        if args.pp_resnet:
            overrides.append(f"model.net.num_resnet={args.pp_resnet}")
    elif data == "cifar10":
        if args.cifar_hidden:
            overrides.append(f"model.net.hidden={args.cifar_hidden}")
        if args.cifar_output:
            overrides.append(f"model.net.output_hidden={args.cifar_output}")
    return overrides
