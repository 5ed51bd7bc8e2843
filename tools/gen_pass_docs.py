"""Regenerate docs/passes.md from the registered passes: `python tools/gen_pass_docs.py`."""
from pathlib import Path

from orca_compiler.pass_docs import pass_reference_markdown

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "passes.md"
    target.write_text(pass_reference_markdown())
    print(f"wrote {target}")
