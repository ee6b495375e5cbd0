"""The lint and type checks that the README promises, run by the same command as every other test."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from service.api.errors import ERROR_CODES, STATUS_CODES
from tests.conftest import ROOT


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_would_change_nothing() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing_in_the_service_training_and_benchmarks() -> None:
    result = run("mypy")  # files and plugins: [tool.mypy] in pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr


def codes_in_the_service() -> dict[str, set[int]]:
    """Every error code the service writes as a literal (``ApiError(status, "code", ...)`` and ``error_response``)."""
    found: dict[str, set[int]] = {}
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "ApiError",
                "error_response",
            ):
                status, code = [*node.args, None, None][:2]
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    found.setdefault(code.value, set()).add(status.value if isinstance(status, ast.Constant) else -1)
    return found


def test_every_error_code_is_catalogued_with_its_status_and_in_the_readme() -> None:
    used = codes_in_the_service()
    assert len(used) > 30
    for code, statuses in used.items():
        assert code in ERROR_CODES, f"{code} is not in ERROR_CODES (service/api/errors.py)"
        assert statuses <= {ERROR_CODES[code][0], -1}, (code, statuses)
    assert set(STATUS_CODES.values()) <= set(ERROR_CODES)
    listed = dict(re.findall(r"^\| `([a-z0-9_]+)` \| (\d{3}) \|", (ROOT / "README.md").read_text(), re.M))
    assert listed == {code: str(status) for code, (status, _) in ERROR_CODES.items()}
