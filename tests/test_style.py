"""The one line-length setting of pyproject.toml holds for every Python file of the project, predict.py's Cog inputs
included (their descriptions are single plain literals, as Cog's static parser needs, so they must fit too)."""
from __future__ import annotations

import subprocess
import tomllib

from conftest import REPO


def test_every_python_line_fits_the_projects_line_length():
    limit = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["line-length"]
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    too_long = [f"{name}:{number}" for name in files.split()
                for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), start=1)
                if len(line) > limit]
    assert not too_long, f"lines over {limit} characters: {too_long}"
