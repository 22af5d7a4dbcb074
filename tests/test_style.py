"""The layout is the formatter's: `ruff format` and `ruff check` (configured in pyproject.toml) pass on the package,
the tests and the benchmarks, so CI (which runs this suite) runs them too."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the test extra pins ruff, so its layout is the same on every machine
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff_passes(command):
    run = subprocess.run(
        [RUFF, *command, "freevlm", "tests", "bench"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
