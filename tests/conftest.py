"""Shared pytest configuration for the drosim test-suite: the ``device`` fixture and the
hypothesis profile. Strategies and numeric helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# One profile for every property test: no per-example deadline (the first call into torch or
# cvxpy is slow) and no too_slow health check (a cvxpy example takes tens of ms).
settings.register_profile(
    "drosim",
    deadline=None,
    print_blob=True,
    # one minimal failing example per test: shrinking a second one doubles a failing run
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)
# For a quick pass on a borrowed GPU: report failures unshrunk.
settings.register_profile(
    "drosim-noshrink",
    parent=settings.get_profile("drosim"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
# CI: the same examples on every run (derived from each test's name), so a red build is
# reproducible and never a new random draw; local runs keep exploring.
settings.register_profile("drosim-ci", parent=settings.get_profile("drosim"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "drosim"))

# The solvers run many small kernels: on a 2-core machine shared with other jobs, intra-op
# threads only oversubscribe it (a 1000-sample KL solve went from 5 ms to 500 ms).
torch.set_num_threads(int(os.environ.get("DROSIM_TEST_THREADS", "1")))

_CUDA = torch.cuda.is_available()


@pytest.fixture(
    scope="session",
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu,
                   pytest.mark.skipif(not _CUDA, reason="CUDA is not available")],
        ),
    ],
)
def device(request) -> torch.device:
    """Every device the solvers must work on: CPU always, CUDA where there is one."""
    return torch.device(request.param)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/fs`` (skipped where mounting is not permitted)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)
