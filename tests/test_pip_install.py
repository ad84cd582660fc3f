"""Plain `pip install .` and `pip install -e .` build llava_agile._C against the installed torch.

Issue 15 §4, as a user would run it: a fresh venv (no system site-packages) gets torch==2.13.0
(the CPU wheel on disk), then, for each pip version in PIPS, the two documented commands with
pip's default build isolation. The isolated build environment holds only pyproject.toml's
requires (setuptools, ninja), so setup.py must find the venv's torch itself (docs/extension.md).
After each install, a check run outside the source tree imports llava_agile._C from where that
install put it and runs select_tokens on the extension backend. Also: `--no-build-isolation`
still works, the venv's packages are unchanged (no second torch), and without torch the build
stops with a message naming `pip install torch`.

Cost: the C++ compile happens once. All builds share one build_temp (LLAVA_AGILE_BUILD_TEMP,
setup.py), so ninja reuses the objects (same torch headers, same flags, same command line) while
every install still runs setup.py under its pip's isolation and links a fresh _C against the
venv's torch. Needs the package index for pip and the build requires (setuptools, ninja).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPS = ("23.2.1", "25.3")  # the oldest and newest pip series the design supports
TORCH = "torch==2.13.0"
TIMEOUT = 1800  # one compile: 1.5-3 min on 2 quiet cores, far more when the machine is shared

CHECK = """
import sys, torch, llava_agile
from llava_agile import _C
where = sys.argv[1]
for mod in (llava_agile, _C):
    assert mod.__file__.startswith(where), (mod.__file__, where)
assert llava_agile.ext_available(), llava_agile.backend.unavailable_reason()
g = torch.Generator().manual_seed(0)
feats, attn = torch.randn(576, 64, generator=g), torch.rand(576, generator=g)
llava_agile.set_backend("ext")
ext = llava_agile.select_tokens(feats, attn, 64, "diversity")
llava_agile.set_backend("torch")
ref = llava_agile.select_tokens(feats, attn, 64, "diversity")
assert ext.shape == (64,) and torch.equal(ext, ref), (ext, ref)
print("ok", _C.__file__)
"""


def run(cmd, env, cwd):
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    out = p.stdout + p.stderr
    shown = " ".join(str(c) if len(str(c)) < 120 else "<script>" for c in cmd)
    print(f"{time.perf_counter() - t:6.1f} s  {shown}")
    return p.returncode, out


# a download from the package index that broke off (not this project's fault): the command is
# run again, at most twice (pip 24.2 and older neither resume nor retry a broken download)
NETWORK = ("ReadTimeoutError", "Read timed out", "IncompleteRead", "Connection reset by peer")


def ok(cmd, env, cwd):
    for attempt in range(3):
        rc, out = run(cmd, env, cwd)
        if rc == 0 or not any(s in out for s in NETWORK):
            break
        print(f"network error (try {attempt + 1} of 3):", out.strip().splitlines()[-1])
    assert rc == 0, f"{cmd} failed ({rc}):\n{out[-6000:]}"
    return out


def packages(py, env, cwd):
    out = ok([py, "-m", "pip", "list", "--format=json"], env, cwd)
    listed = json.loads(out[out.index("["):out.rindex("]") + 1])
    return {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in listed}


def copy_tree(dst: Path):
    """The checkout's files as git sees them (tracked and new, no .venv or build outputs)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())


@pytest.fixture(scope="module")
def setup():
    # our own temp dir: pytest's basetemp rotation (other sessions) must not delete it mid-test
    tmp = Path(tempfile.mkdtemp(prefix="llava_agile_pip_"))
    src = tmp / "src"
    copy_tree(src)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LLAVA_AGILE_BACKEND", "PYTHONNOUSERSITE")}
    env.update(MAX_JOBS=env.get("MAX_JOBS", "2"), LLAVA_AGILE_BUILD_TEMP=str(tmp / "objects"),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    ok([sys.executable, "-m", "venv", tmp / "venv"], env, tmp)
    py = str(tmp / "venv" / "bin" / "python")
    ok([py, "-m", "pip", "install", "-q", "--no-compile", f"pip=={PIPS[0]}", TORCH], env, tmp)
    site = ok([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, tmp)
    yield tmp, src, py, env, site.strip()
    shutil.rmtree(tmp, ignore_errors=True)


def installs(py, env, tmp, *args):
    before = packages(py, env, tmp)
    out = ok([py, "-m", "pip", "install", *args], env, tmp)
    after = packages(py, env, tmp)
    before.pop("llava-agile", None), after.pop("llava-agile", None)
    assert after == before, f"pip install {args} changed other packages: {before} -> {after}"
    return out


@pytest.mark.parametrize("pip", PIPS)
def test_plain_pip_install_builds_against_installed_torch(setup, pip):
    tmp, src, py, env, site = setup
    ok([py, "-m", "pip", "install", "-q", f"pip=={pip}"], env, tmp)
    assert ok([py, "-m", "pip", "--version"], env, tmp).startswith(f"pip {pip} ")
    for args, where in (([str(src)], site), (["-e", str(src)], str(src))):
        t0 = time.time()
        out = installs(py, env, tmp, *args)
        assert "Installing build dependencies" in out, out[-3000:]  # pip's isolation was on
        check(py, env, tmp, where, t0)


def check(py, env, tmp, where, t0):
    """llava_agile and a _C linked by this install (not an old one) load from `where` and work."""
    out = ok([py, "-c", CHECK, where], env, tmp)
    assert out.startswith("ok "), out
    so = out.split()[1]
    assert os.path.getmtime(so) >= t0 - 1, f"{so} was not built by this install"


def test_no_build_isolation_still_works(setup):
    """In the activated venv, with the ninja the isolated builds used (a different ninja would
    not read their build log and recompile everything: slow, not wrong)."""
    tmp, src, py, env, _ = setup
    ok([py, "-m", "pip", "install", "-q", "ninja"], env, tmp)
    env = dict(env, PATH=f"{Path(py).parent}{os.pathsep}{env.get('PATH', '')}")
    t0 = time.time()
    out = installs(py, env, tmp, "--no-build-isolation", "-e", str(src))
    assert "Installing build dependencies" not in out
    check(py, env, tmp, str(src), t0)


def test_without_torch_the_build_names_the_command(setup):
    """A venv without torch: the isolated build stops with the one command that fixes it."""
    tmp, src, py, env, _ = setup
    ok([sys.executable, "-m", "venv", "--without-pip", tmp / "bare"], env, tmp)
    bare = str(tmp / "bare" / "bin" / "python")
    rc, out = run([py, "-m", "pip", "--python", bare, "install", "-e", str(src)], env, tmp)
    assert rc != 0
    assert f"torch is not installed in {tmp / 'bare'}" in out and "`pip install torch`" in out, out
    assert "Collecting torch" not in out
