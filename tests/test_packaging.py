"""Shipping: a built wheel holds the native kernel's source and, installed, uses the native path;
the compiled kernel respects the umask and survives an unwritable cache."""
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK_NATIVE = (
    "import os, torch, el_fairseq; from el_fairseq.loss import dispatch, native; "
    "print(os.path.dirname(el_fairseq.__file__)); "
    "print(dispatch.path_for(torch.zeros(2, 5), 'auto')); print(native.library_path())")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of the project's sources: a build/ folder left in the checkout would
    # otherwise leak files into the wheel that setup.py does not ship.
    src = tmp_path_factory.mktemp("src") / "el-fairseq"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results", "data",
                                                              "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = list(out.glob("el_fairseq-*.whl"))
    return path


def test_wheel_contains_the_native_kernel_source(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert "el_fairseq/loss/native_kernel.c" in names and "el_fairseq/loss/native.py" in names


def test_installed_wheel_uses_the_native_kernel(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "EL_FAIRSEQ_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", CHECK_NATIVE], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    where, path, lib = out.stdout.split()
    assert where == str(target / "el_fairseq") and path == "native"
    assert lib.startswith(str(tmp_path / "cache"))


def test_compiled_kernel_follows_the_umask_and_an_unwritable_cache_builds_privately(tmp_path):
    cache = tmp_path / "shared"
    env = {**os.environ, "EL_FAIRSEQ_CACHE": str(cache), "PYTHONPATH": ROOT}
    code = "import os; os.umask(0o022); " + CHECK_NATIVE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    lib = out.stdout.split()[2]
    assert os.path.dirname(lib) == str(cache) and stat.S_IMODE(os.stat(lib).st_mode) == 0o755
    # A cache folder that cannot be created (its parent is a file): a private build, still native.
    (tmp_path / "afile").write_text("")
    env["EL_FAIRSEQ_CACHE"] = str(tmp_path / "afile" / "cache")
    out = subprocess.run([sys.executable, "-c", CHECK_NATIVE], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    _, path, lib = out.stdout.split()
    assert path == "native" and not lib.startswith(str(tmp_path))
