"""The tree is ruff clean (the rules in pyproject.toml), so the README's test command is also the lint."""

from __future__ import annotations

import shutil
import subprocess

from .conftest import REPO


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is missing: pip install -e '.[test]'"
    done = subprocess.run([ruff, "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
