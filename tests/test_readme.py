"""The README's Python examples run as written, and its figures agree with the code."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_example_runs(index):
    exec(compile(python_blocks()[index], f"README.md example {index}", "exec"), {})


def test_two_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = "python -m pip install '.[test]' && python -m pytest"
    assert "python -m pip install . && python -m kvq demo" in text
    assert test_command in text
    assert test_command in ci


def test_plan_table_matches_the_command(capsys):
    from kvq.cli import main

    text = README.read_text()
    shown = re.search(r"```\n(KV cache of gpt-oss-20b:.*?)```", text, flags=re.DOTALL).group(1)
    assert main(["plan", "--model", "gpt-oss-20b", "--context", "4096", "32768", "131072",
                 "--bits", "16", "8", "4", "2"]) == 0  # fmt: skip
    assert capsys.readouterr().out == shown
