"""Hypothesis profiles: ``ci`` (small, for the 2-core CI box), ``dev`` (default), ``thorough`` (nightly/by hand).

Choose with HYPOTHESIS_PROFILE=ci|dev|thorough.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The project's own runs keep hypothesis's caches in the checkout (peftkit.testing.check would otherwise put them
# under ~/.cache for a plugin author), so that a run's generated cases do not depend on another folder's state.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(__file__).resolve().parent.parent / ".hypothesis"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# docs/examples holds the third-party method that the docs show; the tests import it from there so it cannot rot.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "examples"))


@pytest.fixture
def run_quick_benchmark(tmp_path: Path):
    """Run ``benchmarks/<name>.py --quick`` as a user would (a subprocess, one thread); returns (stdout, report)."""
    import json
    import subprocess

    def run(name: str) -> tuple[str, dict]:
        out = tmp_path / f"{name}.json"
        script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, str(script), "--quick", "--json", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, json.loads(out.read_text())

    return run
