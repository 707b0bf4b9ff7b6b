"""The README names tests as evidence for its claims: each one it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
# `test_module.py::test_name`, or `::test_name` continuing the module named just before.
NAMED = re.compile(r"`(test_\w+\.py)?::(test_\w+)`")


def test_every_test_the_readme_names_exists() -> None:
    readme = (ROOT / "README.md").read_text("utf-8")
    named: list[tuple[str, str]] = []
    module = None
    for match in NAMED.finditer(readme):
        module = match.group(1) or module
        assert module is not None, f"{match.group(0)} names no module"
        named.append((module, match.group(2)))
    assert len(named) >= 10, "the comparison table names its tests"
    missing = [
        f"{module}::{name}" for module, name in named
        if not re.search(rf"^def {name}\(", (ROOT / "tests" / module).read_text("utf-8"),
                         re.MULTILINE)
    ]
    assert not missing, f"the README names tests that do not exist: {missing}"
