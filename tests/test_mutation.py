"""The mutation check's mutants still apply: each pattern is found in today's source.

Running the mutants takes many minutes (``python -m tests.mutation``), so CI does not; this
catches a mutant whose pattern a refactor removed, which would otherwise go unnoticed until
the next full run.
"""

import pytest

from tests import mutation


@pytest.mark.parametrize("mutant", mutation.MUTANTS, ids=lambda m: m.name)
def test_mutant_pattern_is_in_the_source(mutant):
    mutated = mutation.mutated(mutant, mutation.ROOT)  # raises PatternError when stale
    assert mutated != (mutation.ROOT / mutant.path).read_text()
