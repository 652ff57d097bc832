"""benchmarks/train_throughput.py, run for real at one step per case: every case line carries the fields
the README's Benchmarks section quotes, and the ratio lines are the ratios of those cases."""

import json

from helpers import run_script


def test_every_case_reports_its_fields_and_the_ratios_are_those_of_the_cases():
    # Two cases at the MNIST shapes and the config's widths: each is a process that imports torch.
    result = run_script(
        "benchmarks/train_throughput.py",
        *("--models", "pixelcnn", "row_lstm", "--shapes", "mnist_28x28x1_k2"),
        *("--rounds", "1", "--steps", "1"),
        timeout=600,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    cases = {line["case"]: line for line in lines if line["case"].startswith("train/")}
    shapes = ("mnist_28x28x1_k2",)
    assert set(cases) == {f"train/{m}/{s}" for m in ("pixelcnn", "row_lstm") for s in shapes}
    for name, case in cases.items():
        assert case["code"] == "current" and case["threads"] == 1, name
        assert case["cpu_ms"] > 0 and case["gflop_per_step"] > 0 and case["saved_mb_per_image"] > 0, name
        per_step = case["gflop_per_s"] * case["cpu_ms"] / 1e3  # both rounded in the output
        assert abs(per_step - case["gflop_per_step"]) <= 0.01 * case["gflop_per_step"] + 0.001, name
        assert case["recurrence_tanh"] in ("torch.tanh", "2 sigmoid(2x) - 1"), name
        assert case["allocator"], name
    assert cases["train/row_lstm/mnist_28x28x1_k2"]["hidden"] == 16  # conf/model/row_lstm.yaml
    for shape in shapes:
        ratio = next(line for line in lines if line["case"] == f"step_time_ratio/{shape}")
        row, pixelcnn = (cases[f"train/{m}/{shape}"]["cpu_ms"] for m in ("row_lstm", "pixelcnn"))
        # the ratio is taken before the cases' times are rounded to 0.1 ms
        assert abs(ratio["row_lstm/pixelcnn"] - row / pixelcnn) < 0.01 + 0.1 / pixelcnn
        flops = next(line for line in lines if line["case"] == f"flop_ratio/{shape}")
        row, pixelcnn = (cases[f"train/{m}/{shape}"]["gflop_per_step"] for m in ("row_lstm", "pixelcnn"))
        assert abs(flops["row_lstm/pixelcnn"] - row / pixelcnn) < 0.01 + 0.001 / pixelcnn
