"""The installed package: zoo.models and zoo.guides import from anywhere, and no generic
top-level name (models, guides) is installed."""

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


def test_models_and_guides_import_from_outside_the_repository(tmp_path):
    code = ("import importlib.util, zoo.models.ppca, zoo.guides.ppca; "
            "assert importlib.util.find_spec('models') is None; "
            "assert importlib.util.find_spec('guides') is None; "
            "print(zoo.models.ppca.PPCA.__name__, zoo.guides.ppca.FullGuide.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PPCA", "FullGuide"]


@pytest.mark.slow
def test_wheel_holds_only_the_zoo_package(tmp_path):
    # built from a copy of the sources, so that no stale build/ folder can fill the wheel
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        "build", ".venv", "*.egg-info", ".git", "runs", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("zoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"zoo"}
    assert {"zoo/models/ppca.py", "zoo/guides/ppca.py", "zoo/cli.py"} <= set(names)
    sources = {"zoo/" + path.relative_to(REPO / "zoo").as_posix()
               for path in (REPO / "zoo").rglob("*.py")}
    assert sources <= set(names), f"not in the wheel (setup.cfg packages): {sources - set(names)}"
