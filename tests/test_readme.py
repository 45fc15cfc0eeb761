"""The README's generated parts stay in step with the code.

Run `python tests/test_readme.py` to rewrite the methods table after changing the registry.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE = re.compile(r"(<!-- methods-table:start -->\n)(.*?)(<!-- methods-table:end -->)", re.DOTALL)


def current_table() -> str:
    sys.path.insert(0, str(README.parent))
    import merge

    return merge.methods_table()


def test_readme_methods_table_matches_the_registry():
    match = TABLE.search(README.read_text())
    assert match, "README lacks the methods-table markers"
    assert match.group(2).strip() == current_table(), "stale README table: run python tests/test_readme.py"


def test_readme_documents_every_flag():
    sys.path.insert(0, str(README.parent))
    import merge

    text = README.read_text()
    flags = {s for a in merge.build_parser()._actions for s in a.option_strings if s.startswith("--")}
    missing = sorted(f for f in flags if f"`{f}" not in text and f not in text)
    assert not missing, f"flags missing from the README: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in README.read_text() and "python -m pytest -q tests" in ci


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(TABLE.sub(lambda m: m.group(1) + current_table() + "\n" + m.group(3), text))
    print("README methods table rewritten")
