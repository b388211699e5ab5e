"""The package as a user gets it: a wheel, installed non-editable into a fresh environment.

Built from a clean copy of the source tree (no build/ or egg-info left over from earlier
builds), the wheel must hold one top-level package, drosim, with every module of drosim/,
llm/ (as drosim.llm, with its configs) and paper_checks/ (as drosim.paper_checks). It is
installed into a new virtual environment that sees the dependencies of this one (torch,
transformers, ...) but not its editable drosim, and then, from a folder outside the checkout:
every module imports, the console scripts answer --help and --version, one study and one
paper check run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package it installs as
TREES = {"drosim": "drosim", "llm": "drosim/llm", "paper_checks": "drosim/paper_checks"}
NOT_SOURCE = (".venv", ".git", "build", "dist", "figures", "runs", "bench", "gpu_out",
              "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", ".ruff_cache",
              ".whl")

pytestmark = pytest.mark.slow

IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import drosim

def fail(name):
    raise ImportError(f"walk_packages could not import {name}")

names = ["drosim"] + sorted(
    m.name for m in pkgutil.walk_packages(drosim.__path__, "drosim.", onerror=fail))
for name in names:
    importlib.import_module(name)
files = {n: m.__file__ for n, m in sys.modules.items()
         if n.split(".")[0] == "drosim" and getattr(m, "__file__", None)}
editable = [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()]
editable += [n for n in sys.modules if "editable" in n.lower()]
print(json.dumps({"names": names, "files": files, "editable": editable,
                  "version": drosim.__version__}))
"""


def _expected_wheel_files() -> set[str]:
    """Every module and config file of the source trees, at its path in the wheel."""
    expected = set()
    for folder, package in TREES.items():
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or path.suffix not in (".py", ".yaml"):
                continue
            expected.add(f"{package}/{path.relative_to(ROOT / folder).as_posix()}")
    return expected


def _module_name(wheel_path: str) -> str:
    name = wheel_path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 180
         ) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, (f"{' '.join(command)} exited {done.returncode}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    clean_env = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}

    # 1. Build the wheel from a clean copy of the tree (no build isolation: no network).
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(wheels), str(source)], clean_env, tmp_path)
    (wheel,) = wheels.glob("drosim-*.whl")

    # 2. Its contents: one top-level package, every module and config file.
    dist_info = f"drosim-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
    assert {name.split("/")[0] for name in names} == {"drosim", dist_info}
    assert top_level == ["drosim"]
    expected = _expected_wheel_files()
    assert expected - names == set(), "files of the source tree missing from the wheel"
    for pattern in ("drosim/studies/", "drosim/llm/configs/", "drosim/paper_checks/"):
        assert any(n.startswith(pattern) for n in expected), pattern

    # 3. A fresh environment: the wheel, non-editable, and this environment's dependencies
    #    on its path through a .pth line (a plain path: the .pth files there, among them
    #    the editable install's finder, are not run).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], clean_env, tmp_path)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(wheel)], clean_env, tmp_path)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                         "'purelib'))"], clean_env, tmp_path).stdout.strip())
    (purelib / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    # 4. From a folder outside the checkout, offline.
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env | {"PATH": f"{venv / 'bin'}{os.pathsep}{clean_env.get('PATH', '')}",
                       "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    report = json.loads(_run([str(python), "-c", IMPORT_EVERYTHING], env, work).stdout)
    assert report["editable"] == []
    assert report["version"] == version
    assert set(report["names"]) == {_module_name(n) for n in expected if n.endswith(".py")}
    for name, file in report["files"].items():
        assert Path(file).is_relative_to(purelib), f"{name} imported from {file}"

    for script in ("drosim", "drosim-llm"):
        assert (venv / "bin" / script).exists()
        assert "usage:" in _run([script, "--help"], env, work).stdout
        assert _run([script, "--version"], env, work).stdout.strip() == f"{script} {version}"

    study = _run(["drosim", "study", "updates", "--preset", "quick", "--out", "study"],
                 env, work)
    for name in ("updates.csv", "updates.png", "updates.pdf"):
        assert (work / "study" / name).stat().st_size > 0, study.stdout

    run = _run(["drosim", "run", "--preset", "quick", "--only", "published_chi2"], env, work)
    out = work / "figures" / "quick"
    for name in ("claims.csv", "claims.md", "checks/published_chi2.csv"):
        assert (out / name).stat().st_size > 0, run.stdout
    assert "== published_chi2:" in run.stdout
