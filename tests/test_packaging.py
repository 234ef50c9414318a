"""The installed package: one ``anomaly`` namespace, and a runtime proven torch-free where it matters.

``pip install .`` must put only ``anomaly`` into site-packages (``data/``, ``training/`` and
``deploy/`` install as ``anomaly.data``, ``anomaly.training``, ``anomaly.deploy``), so a user's own
``data.py`` cannot shadow us. And the runtime's tests must pass in a venv that has no torch at all
(``.venv-runtime``: the base install plus the ``[serve]`` extra, made by ``make test``; made here
when missing), not just a ``sys.modules`` check in a venv that has torch.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_VENV = ROOT / ".venv-runtime"

# The runtime's tests, run again without torch. Tests in them that need torch carry @pytest.mark.torch.
TORCH_FREE_TESTS = ("test_audit.py", "test_audit_faults.py", "test_regions.py", "test_calibration.py", "test_review.py", "test_evaluate.py",
                    "test_tiling.py",
                    "test_data.py", "test_metrics.py")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the current tree (no dependencies, built once per test session)."""
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # the build needs nothing this venv lacks
    r = _run(cmd, timeout=300, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("anomaly-*.whl")
    return whl


@pytest.fixture(scope="module")
def runtime_python(wheel: Path) -> Path:
    """``.venv-runtime``'s python with the current wheel installed (the venv itself is reused)."""
    py = RUNTIME_VENV / "bin" / "python"
    if not (RUNTIME_VENV / ".installed").exists():
        r = _run([sys.executable, "-m", "venv", "--clear", str(RUNTIME_VENV)], timeout=120)
        assert r.returncode == 0, r.stderr
        r = _run([str(py), "-m", "pip", "install", "--quiet", f"{wheel}[serve]", "pytest", "httpx"], timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        (RUNTIME_VENV / ".installed").touch()
    r = _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return py


def test_wheel_installs_one_namespace(wheel: Path) -> None:
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"anomaly"}
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("anomaly/data/io.py", "anomaly/deploy/runtime.py", "anomaly/training/trainer.py",
                   "anomaly/training/objectives/aae.py", "anomaly/zoo/aae.py"):
        assert module in names


def test_user_modules_named_data_deploy_training_do_not_shadow_the_package(runtime_python: Path, trained_bundle: dict,
                                                                           tmp_path: Path) -> None:
    # a user's project folder, as ML projects often have it; the interpreter starts there, so it is
    # first on sys.path
    (tmp_path / "data.py").write_text("raise ImportError('the user data.py was imported')\n")
    (tmp_path / "deploy.py").write_text("raise ImportError('the user deploy.py was imported')\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("raise ImportError('the user training package was imported')\n")
    image = sorted((trained_bundle["data"] / "test").rglob("*.png"))[0]
    code = ("import sys, anomaly\n"
            "from anomaly import Runtime, Preprocess, read_image, run_audit\n"
            "import anomaly.data.io, anomaly.deploy.audit\n"
            f"r = Runtime({str(trained_bundle['bundle'])!r}).score_image(read_image({str(image)!r}, raw=True))\n"
            "print(anomaly.__file__, r.score)\n"
            "assert 'site-packages' in anomaly.__file__, anomaly.__file__\n"
            "assert 'torch' not in sys.modules\n")
    r = _run([str(runtime_python), "-c", code], timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"site-packages/anomaly/__init__\.py \d", r.stdout)


def test_runtime_venv_has_no_torch(runtime_python: Path) -> None:
    r = _run([str(runtime_python), "-c", "import torch"], timeout=60)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_runtime_tests_pass_without_torch(runtime_python: Path, trained_bundle: dict, tmp_path: Path) -> None:
    # a copy of the session's trained bundle: the tests there may not change the torch venv's files
    given = {}
    for key in ("data", "run", "bundle"):
        given[key] = str(shutil.copytree(trained_bundle[key], tmp_path / "trained" / key))
    env = {**os.environ, "ANOMALY_TEST_TRAINED": json.dumps(given)}
    env.pop("PYTHONPATH", None)
    # -P: the working folder is not put on sys.path, so `anomaly` is the installed wheel, never the source tree
    cmd = [str(runtime_python), "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not torch",
           "--rootdir", str(ROOT), "-c", str(ROOT / "setup.cfg"), *(str(ROOT / "tests" / t) for t in TORCH_FREE_TESTS)]
    r = _run(cmd, timeout=600, cwd=tmp_path, env=env)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
    assert passed >= 60, tail  # the runtime's tests ran there, not a handful
    assert "skipped" not in r.stdout.splitlines()[-1], tail
