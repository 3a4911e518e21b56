"""The main job as a command: ``python -m kvq demo`` and the ``kvq`` script's entry point."""

import re
import subprocess
import sys

import pytest

from kvq.cli import main


def test_demo_reports_shape_ratio_errors_and_throughput(capsys):
    assert main(["demo", "--tokens", "256", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "(8, 256, 64)" in out
    assert "3.20x" in out
    k_max, k_bound = map(
        float, re.search(r"K error\s+max (\S+) \(largest scale/2 (\S+)\)", out).groups()
    )
    assert 0 < k_max <= k_bound * (1 + 1e-5)
    assert re.search(r"quantize K\+V\s+\d+\.\d+ ms\s+\d+\.\d+ GB/s", out)
    assert re.search(r"np\.copyto K\+V\s+\d+\.\d+ ms", out)


def test_demo_float16_scales(capsys):
    assert main(["demo", "--tokens", "64", "--repeats", "1", "--scale-dtype", "float16"]) == 0
    assert "3.56x" in capsys.readouterr().out


def test_bad_arguments_exit_nonzero(capsys):
    assert main(["demo", "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--block-size", "0"]) == 2
    assert "--block-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_python_dash_m_runs_in_a_new_process():
    result = subprocess.run(
        [sys.executable, "-m", "kvq", "demo", "--tokens", "32", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "compression" not in result.stderr
    assert "kvq demo" in result.stdout


def test_help_lists_demo():
    result = subprocess.run(
        [sys.executable, "-m", "kvq", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout
