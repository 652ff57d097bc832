"""python -m pixel_models.results: one table from run folders, read as plain data, never executed."""

import csv
import json
import math

import pytest

from pixel_models.results import collect, main

LN2 = math.log(2)


def write_run(folder, metrics, config_text, choices=None):
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / ".hydra" / "config.yaml").write_text(config_text)
    if choices is not None:
        lines = "".join(f"      {k}: {v}\n" for k, v in choices.items())
        (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n{lines}")


CONFIG = """\
data:
  _target_: datamodules.digits.DigitsDataModule
  num_channels: 1
  image_size: 8
model:
  _target_: pixel_models.training.module.AutoregressiveModule
  net:
    arch: row_lstm
  num_channels: ${data.num_channels}
output_dir: ${hydra:runtime.output_dir}
note: ${oc.env:HOME}
"""


def test_table_has_a_row_per_run_with_its_own_numbers(tmp_path, capsys):
    nll = 91.0
    write_run(
        tmp_path / "sweep" / "0",
        {
            "val/nll": nll,
            "val/bpd": nll / (64 * LN2),
            "test/nll": 90.0,
            "test/bpd": 90.0 / (64 * LN2),
            "best/epoch": 18,
            "best/checkpoint": "ckpts/best_epoch018.ckpt",
            "global_step": 380,
            "epochs": 20,
            "params": 12345,
        },
        CONFIG,
        {"model": "row_lstm", "data": "digits", "experiment": "null"},
    )
    # a metrics.json from before reports were labelled: bits/dim of another epoch than the NLL
    write_run(tmp_path / "sweep" / "1", {"val/nll": nll, "val/bpd": 2.0626, "global_step": 380}, CONFIG)
    out_csv, out_md = tmp_path / "r.csv", tmp_path / "r.md"
    assert main([str(tmp_path / "sweep"), "--csv", str(out_csv), "--markdown", str(out_md)]) == 0
    printed = capsys.readouterr().out
    assert printed == out_md.read_text()
    assert "| 0 | row_lstm | digits | 380 | 20 | 12345 | 18 | 91.00 | 2.0513 | 90.00 | 2.0288 |" in printed

    rows = list(csv.DictReader(open(out_csv)))
    assert [r["run"] for r in rows] == ["0", "1"]
    assert float(rows[0]["val_bpd"]) == pytest.approx(nll / (64 * LN2), rel=1e-12)  # full precision in CSV
    assert rows[0]["checkpoint"] == "ckpts/best_epoch018.ckpt" and rows[0]["note"] == ""
    assert rows[1]["model"] == "row_lstm" and rows[1]["data"] == "DigitsDataModule"  # from the config
    assert "val bits/dim is not this NLL's" in rows[1]["note"]


def test_configs_are_read_as_plain_data(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("os.system", lambda *a: ran.append(a))
    # a YAML tag that would build a Python object, and a _target_ that would run a command
    write_run(tmp_path / "a", {"val/nll": 1.0}, "x: !!python/object/apply:os.system ['echo hi']\n")
    write_run(tmp_path / "b", {"val/nll": 2.0}, "data:\n  _target_: os.system\n  command: echo hi\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text("{not json")
    rows, problems = collect([tmp_path])
    assert not ran
    assert [r["val_nll"] for r in rows] == [1.0, 2.0]
    assert rows[0]["model"] is None and rows[1]["data"] == "system"  # a name, never called
    assert len(problems) == 1 and "c/metrics.json" in problems[0]


def test_bad_folder_is_one_clear_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 1
    assert "no metrics.json" in capsys.readouterr().err
