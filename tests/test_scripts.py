"""The Quick start's two commands (``.ci/samples``, ``.ci/tests``), the checks (``.ci/lint``) and CI's ``.ci/run``,
on a copy of the project whose apt, dpkg, sudo, Python, ruff and mypy are stand-ins that log what they are asked:
each command installs only what is missing, then runs its job; ``.ci/install`` waits for another apt's lock instead
of failing."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = [".ci/install", ".ci/tests", ".ci/samples", ".ci/lint", ".ci/run"]
PINS = ["requirements.txt", "requirements-dev.txt", "setup.py", "pyproject.toml"]

# The stand-ins. apt-get fails `update` while the lists' lock counter is above zero, as apt does when another apt
# holds that lock; dpkg-query reports a package as installed once apt-get installed it (or the test said so).
FAKES = {
    "sudo": 'exec "$@"\n',
    "apt-get": """echo "apt-get $*" >> "$LOG"
if [[ " $* " == *" update "* ]] && [ "$(cat "$STATE/lock_held")" -gt 0 ]; then
  echo $(( $(cat "$STATE/lock_held") - 1 )) > "$STATE/lock_held"
  echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)" >&2
  exit 100
fi
if [[ " $* " == *" install "* ]]; then
  for word in "$@"; do [[ "$word" == -* || "$word" == install ]] || touch "$STATE/installed-$word"; done
fi
""",
    "dpkg-query": """package="${@: -1}"
[ -e "$STATE/installed-$package" ] && printf installed || printf not-installed
""",
    # The interpreter that makes the venv: its python, pip, ruff and mypy log their arguments; ruff and mypy fail
    # when the test names them in $FAIL.
    "python-for-venv": """echo "python $*" >> "$LOG"
mkdir -p .venv/bin
printf '#!/usr/bin/env bash\\n[ "$1" = -c ] && exit 0\\necho "venv-python $*" >> "$LOG"\\n' > .venv/bin/python
printf '#!/usr/bin/env bash\\necho "pip $*" >> "$LOG"\\n' > .venv/bin/pip
for tool in ruff mypy; do
  printf '#!/usr/bin/env bash\\necho "%s${*:+ $*}" >> "$LOG"\\n' $tool > .venv/bin/$tool
  printf '[[ " $FAIL " != *" %s "* ]]\\n' $tool >> .venv/bin/$tool
done
chmod +x .venv/bin/python .venv/bin/pip .venv/bin/ruff .venv/bin/mypy
""",
}


class Project:
    """A copy of the scripts and pin files, with the stand-ins first on PATH."""

    def __init__(self, root: Path):
        self.root, self.state, self.log = root / "project", root / "state", root / "calls.log"
        for name in SCRIPTS + PINS:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / name, self.root / name)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for name, body in FAKES.items():
            (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
            (bin_dir / name).chmod(0o755)
        self.state.mkdir()
        self.hold_lock(0)
        self.log.touch()
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(self.log),
                    "STATE": str(self.state), "PYTHON": str(bin_dir / "python-for-venv"), "APT_LOCK_POLL_S": "0",
                    "FAIL": ""}

    def hold_lock(self, tries: int) -> None:
        (self.state / "lock_held").write_text(str(tries))

    def have(self, *packages: str) -> None:
        for package in packages:
            (self.state / f"installed-{package}").touch()

    def run(self, script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        """Run one script; its result and the calls the stand-ins logged meanwhile."""
        before = len(self.log.read_text().splitlines())
        proc = subprocess.run(["bash", script, *args], cwd=self.root, capture_output=True, text=True,
                              env={**self.env, **env}, timeout=60)
        return proc, self.log.read_text().splitlines()[before:]


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path)


ALL_PACKAGES = ("espeak-ng", "libgl1", "libglib2.0-0")


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith(("apt-get", "python ", "pip"))]


def test_the_test_command_installs_what_is_missing_once_then_runs_pytest_as_before(project):
    proc, calls = project.run(".ci/tests", "-k", "style")
    assert proc.returncode == 0, proc.stderr
    assert "python -m venv .venv" in calls and "pip install -q -r requirements-dev.txt" in calls
    assert any(c.startswith("apt-get") and "install" in c and "espeak-ng" in c for c in calls)
    assert calls[-1] == "venv-python -m pytest -q -k style"
    proc, calls = project.run(".ci/tests")
    assert proc.returncode == 0 and installs(calls) == [] and proc.stderr == ""  # a second run installs nothing
    assert calls == ["venv-python -m pytest -q"]


def test_a_changed_pin_or_a_removed_venv_installs_again(project):
    project.run(".ci/tests")
    with open(project.root / "requirements.txt", "a") as f:
        f.write("# a new pin\n")
    _, calls = project.run(".ci/tests")
    assert "pip install -q -r requirements-dev.txt" in calls
    shutil.rmtree(project.root / ".venv")
    _, calls = project.run(".ci/tests")
    assert "python -m venv .venv" in calls


def test_only_missing_system_packages_are_installed(project):
    project.have("espeak-ng", "libgl1")
    _, calls = project.run(".ci/tests")
    apt = [c for c in calls if c.startswith("apt-get")]
    assert len(apt) == 2 and apt[1].endswith("install -y -qq --no-install-recommends libglib2.0-0"), apt


def test_install_waits_for_another_apts_lock(project):
    project.hold_lock(3)
    proc, calls = project.run(".ci/install")
    assert proc.returncode == 0, proc.stderr
    assert "another apt holds its lock" in proc.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert [c.split()[-2:] for c in apt[:4]] == [["update", "-qq"]] * 4  # three refusals, then the update
    assert all("-o DPkg::Lock::Timeout=300" in c for c in apt)  # and apt itself waits for dpkg's lock
    assert all(f"installed-{p}" in os.listdir(project.state) for p in ALL_PACKAGES)


def test_install_gives_up_with_apts_message_once_the_wait_is_over(project):
    project.hold_lock(100)
    proc, calls = project.run(".ci/install", APT_LOCK_WAIT_S="0")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("E: Could not get lock /var/lib/apt/lists/lock")
    assert len([c for c in calls if c.startswith("apt-get")]) == 1
    assert not (project.root / ".venv").exists()


def test_the_samples_command_lip_syncs_the_bundled_samples(project):
    project.have(*ALL_PACKAGES)
    project.run(".ci/install")
    proc, calls = project.run(".ci/samples", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert calls == ["venv-python -m latentsync samples/face.mp4 samples/speech.wav -o out/samples_lipsynced.mp4 "
                     "--device cpu"]


def test_ci_installs_everything_from_scratch_then_runs_the_test_command(project):
    project.have(*ALL_PACKAGES)
    project.run(".ci/install")
    proc, calls = project.run(".ci/run")
    assert proc.returncode == 0, proc.stderr
    assert "python -m venv .venv" in calls and calls[-1] == "venv-python -m pytest -q"


def test_ci_runs_ruff_and_mypy_after_the_install_and_before_the_tests(project):
    project.have(*ALL_PACKAGES)
    proc, calls = project.run(".ci/run")
    assert proc.returncode == 0, proc.stderr
    steps = [c for c in calls if c.startswith(("python -m venv", "ruff", "mypy", "venv-python"))]
    assert steps == ["python -m venv .venv", "ruff check .", "mypy", "venv-python -m pytest -q"]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_a_finding_of_ruff_or_mypy_fails_ci_before_the_tests_run(project, tool):
    project.have(*ALL_PACKAGES)
    proc, calls = project.run(".ci/run", FAIL=tool)
    assert proc.returncode != 0
    assert calls[-1].startswith(tool) and not any(c.startswith("venv-python -m pytest") for c in calls)


def test_the_lint_command_installs_what_is_missing_then_runs_both_checks(project):
    proc, calls = project.run(".ci/lint")
    assert proc.returncode == 0, proc.stderr
    assert "pip install -q -r requirements-dev.txt" in calls and calls[-2:] == ["ruff check .", "mypy"]
    proc, calls = project.run(".ci/lint")
    assert proc.returncode == 0 and installs(calls) == [] and calls == ["ruff check .", "mypy"]
