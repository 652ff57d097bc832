"""receptive_field.py: the leak and blind-spot report, on networks whose answer is known."""

import pytest
import torch
from helpers import ROOT, run_script
from hydra import compose, initialize_config_dir
from test_contract import ToyMaskedNetwork

import receptive_field
from pixel_models.architectures import ARCHITECTURES


def compose_report(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="receptive_field", overrides=list(overrides))


def test_diagonal_bilstm_has_no_leak_and_no_blind_spot(tmp_path, capsys):
    cfg = compose_report("model=diag_bilstm", "data=cifar10", "size=5", f"output={tmp_path / 'rf.png'}")
    assert receptive_field.report(cfg) == 0
    out = capsys.readouterr().out
    assert "no leak" in out and "no blind spot" in out
    assert "colour 2 reads colour 1 of its own pixel everywhere" in out
    assert (tmp_path / "rf.png").stat().st_size > 0


def test_row_lstm_blind_spot_is_the_far_end_of_the_row_above(tmp_path, capsys):
    # One layer (k=3) after the 7x7 first layer: pixel (4, 1) of a 6x12 image cannot see (3, 9), 8 columns
    # to the right on the row above (the first layer reaches 3, the triangle 1 more per layer).
    cfg = compose_report(
        "model=row_lstm", "model.net.num_layers=1", "size=10", "pixel=[5,1]", f"output={tmp_path / 'rf.png'}"
    )
    assert receptive_field.report(cfg) == 0
    out = capsys.readouterr().out
    assert "no leak" in out and "blind spots:" in out


def test_a_leak_is_reported_and_exits_1(tmp_path, capsys, monkeypatch):
    class Leaky(ToyMaskedNetwork):
        def __init__(self, num_channels, num_levels, output=None, num_classes=0, **pixelcnn_settings):
            super().__init__(num_channels, num_levels, output=output, num_classes=num_classes)
            self.first.mask[:, :, 3, 4] = 1  # the pixel to the right

    monkeypatch.setitem(ARCHITECTURES, "leaky", Leaky)
    cfg = compose_report("model.net.arch=leaky", "size=4", f"output={tmp_path / 'rf.png'}")
    assert receptive_field.report(cfg) == 1
    out = capsys.readouterr().out
    assert "LEAK" in out and "<- (0,0,1)" in out  # output (0, 0, 0) reads input (0, 0, 1)


def test_picture_colours_mark_seen_unseen_and_the_pixel():
    grads = torch.zeros(1, 3, 3, 1, 3, 3, dtype=torch.float64)
    grads[0, 1, 1, 0, 0, 0] = 1.0  # pixel (1, 1) sees (0, 0) only
    result = receptive_field.analyse(grads)
    assert int(result["missed_count"][1, 1]) == 3  # (0, 1), (0, 2), (1, 0)
    image = receptive_field.picture(grads, result, (1, 1), scale=4).convert("RGB")
    top = 14  # caption
    assert image.getpixel((1 * 4 + 1, top + 1 * 4 + 1)) == (255, 255, 255)  # the pixel itself
    assert image.getpixel((0 * 4 + 1, top + 0 * 4 + 1))[1] > 200  # seen: green
    assert image.getpixel((1 * 4 + 1, top + 0 * 4 + 1))[0] > 200  # earlier, unseen: red


def test_bad_settings_are_one_line_errors(tmp_path):
    result = run_script("receptive_field.py", "pixel=[99,0]", check=False)
    assert result.returncode == 2 and "error: pixel=[99, 0]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("arch", ["pixelcnn"])
def test_script_runs_end_to_end(tmp_path, arch):
    out = tmp_path / "rf.png"
    result = run_script("receptive_field.py", f"model={arch}", "size=6", f"output={out}")
    assert "no leak" in result.stdout and out.is_file()
