"""The README's `AnchorCallback` example runs as written, from the repository root, in a fresh process."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    """The first ```python block under the README section ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_training_example_runs_as_written(tmp_path):
    code = readme_block("Anchoring during fine-tuning")
    ast.parse(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    printed = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the example prints the anchor metrics
    assert {"anchor/kl", "anchor/below_floor", "anchor/weight"} <= set(printed)
    assert any(k.startswith("anchor/proj/layer_") for k in printed)
