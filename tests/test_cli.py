"""The command line: ``python -m kvq demo``/``plan``/``bench`` and the ``kvq`` script."""

import re
import subprocess
import sys
from pathlib import Path

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
    assert "--group-size must be >= 1" in capsys.readouterr().err
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


def test_help_lists_the_three_commands():
    result = subprocess.run(
        [sys.executable, "-m", "kvq", "--help"], capture_output=True, text=True, check=True
    )
    listed = set(re.findall(r"^\s{4}(\w+)\s", result.stdout, re.MULTILINE))
    assert {"demo", "plan", "bench"} <= listed, result.stdout


def test_bench_help_names_quick(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kvq bench" in out
    assert "--quick" in out
    assert "--only" in out


def test_bench_finds_run_all_in_this_checkout():
    from kvq.cli import find_run_all

    found = find_run_all()
    assert found is not None
    assert found == Path(__file__).resolve().parent.parent / "bench" / "run_all.py"


def test_bench_passes_quick_and_only_through(tmp_path, monkeypatch, capfd):
    script = tmp_path / "bench" / "run_all.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr("kvq.cli.find_run_all", lambda: script)
    assert main(["bench", "--quick", "--only", "quality"]) == 3
    assert "ARGS ['--quick', '--only', 'quality']" in capfd.readouterr().out


def test_bench_outside_a_checkout_says_where_the_benchmarks_are(monkeypatch, capsys):
    monkeypatch.setattr("kvq.cli.find_run_all", lambda: None)
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "source repository" in err
    assert "bench/run_all.py" in err
