"""Build hook: the wheel carries the top-level ``configs/`` and ``weights.txt`` as package data (``latentsync/_data``).

They stay at the repository's top level (upstream's layout, and what the Cog container reads); copying them at build
time keeps one copy in git. Everything else about the package is in ``pyproject.toml``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = ("configs", "weights.txt")


class BuildWithData(build_py):
    """``build_py`` that also copies the shipped data into ``latentsync/_data`` of the build."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "latentsync" / "_data"
        for name in DATA:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildWithData})
