"""In CI a test that would be skipped for a missing test extra fails instead (tests/conftest.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
NEEDS_A_MISSING_EXTRA = """
import pytest


def test_needs_an_extra():
    pytest.importorskip("hierpool_no_such_module")


def test_skipped_on_purpose():
    pytest.skip("a skip that is not about a missing extra")
"""


def _run(tmp_path, ci: str | None):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_extra.py").write_text(NEEDS_A_MISSING_EXTRA)
    # no third-party plugins autoloaded: the hook under test is the conftest's, and their imports were most of each run
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_extra_fails_the_run_in_ci_and_skips_elsewhere(tmp_path):
    result = _run(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 skipped" in result.stdout and "CI=true: a test extra is missing" in result.stdout
    result = _run(tmp_path, None)
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout
