"""The README's code block under a given heading (so the snippets are tested as written)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block of the README section titled ``heading``."""
    text = README.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts:
        if part.startswith(heading + "\n"):
            blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
            assert blocks, f"README section {heading!r} has no python block"
            return blocks[0]
    raise AssertionError(f"README has no section {heading!r}")


def run_block(heading: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(python_block(heading), f"README: {heading}", "exec"), namespace)
    return namespace
