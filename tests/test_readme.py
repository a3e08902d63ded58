"""The README's quick start must run as written (so it cannot drift from the API)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_reports_statistics(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    stats = namespace["reg"].last_stats
    # 64 hidden ReLU units + 5 logits, pooled; deaths lie in [0, 1]
    assert stats.neurons == 69
    assert 0.0 <= stats.min_death <= stats.mean_death <= stats.max_death <= 1.0
    assert not namespace["reg"]._handles, "hooks must be removed when the with block ends"
    assert "StepStats(" in capsys.readouterr().out
