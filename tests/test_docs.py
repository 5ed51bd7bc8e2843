"""The pass reference in docs/ is generated from the pass declarations and must be current."""
from pathlib import Path

from orca_compiler.pass_docs import pass_reference_markdown


def test_pass_reference_is_current():
    path = Path(__file__).resolve().parent.parent / "docs" / "passes.md"
    assert path.read_text() == pass_reference_markdown(), "run: python tools/gen_pass_docs.py"
