"""patches/: apply.sh on the llava-torch 1.2.2.post1 wheel's tree (a copy of the installed
package), the patched eval modules end to end on CPU, re-runs, refusals.

Set LLAVA_AGILE_TEST_TREES=dir1:dir2 (checkouts of haotian-liu/LLaVA c121f04 or
Theia-4869/FasterVLM f5d5f12) to also patch copies of those trees and compile the result.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from llava_probe import make_inputs, run_probe  # noqa: E402

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "patches")
APPLY = os.path.join(PATCHES, "apply.sh")
PATCHED = ["model/builder.py", "eval/model_vqa_loader.py", "eval/model_vqa_science.py",
           "eval/model_vqa_mmbench.py", "eval/model_vqa.py", "eval/run_llava.py"]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="apply.sh needs git")


def installed_llava():
    import llava
    return os.path.dirname(os.path.abspath(llava.__file__))


def copy_llava(dest):
    shutil.copytree(installed_llava(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def apply(path):
    return subprocess.run(["bash", APPLY, str(path)], capture_output=True, text=True, timeout=120)


def digests(pkg):
    out = {}
    for base, _, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(base, name), "rb") as f:
                    out[os.path.relpath(os.path.join(base, name), pkg)] = \
                        hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A patched copy of the wheel's llava/ package in <tmp>/site, plus a tiny model and data."""
    from llava_agile.assets import build_tiny_llava

    root = tmp_path_factory.mktemp("patches")
    pkg = copy_llava(str(root / "site" / "llava"))
    proc = apply(pkg)
    assert proc.returncode == 0, proc.stderr
    assert "as llava-v1.2.2.post1" in proc.stdout
    work = root / "work"
    work.mkdir()
    return {"site": str(root / "site"), "pkg": pkg, "work": str(work),
            "model": build_tiny_llava(str(root / "model"), seed=1), **make_inputs(str(root))}


def test_patched_files_delegate_and_compile(site):
    import py_compile

    for rel in PATCHED:
        with open(os.path.join(site["pkg"], rel)) as f:
            text = f.read()
        assert "llava_agile" in text, rel
        py_compile.compile(os.path.join(site["pkg"], rel), doraise=True,
                           cfile=os.path.join(site["work"], "compiled.pyc"))
        if rel.startswith("eval/"):
            assert "parse_args_with_pruning(parser)" in text and "pruning=" in text
            assert ".cuda()" not in text and "'cuda'" not in text and "half()" not in text


def test_rerun_is_a_noop(site):
    before = digests(site["pkg"])
    proc = apply(site["pkg"])
    assert proc.returncode == 0, proc.stderr
    assert "already patched; nothing to do" in proc.stdout
    assert digests(site["pkg"]) == before


def _answers(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("flags,keep", [(["--pruning", "adaptive", "--keep", "64"], 64),
                                        ([], 576)])
def test_patched_model_vqa_loader_end_to_end(site, flags, keep):
    answers = os.path.join(site["work"], f"loader-{keep}.jsonl")
    rc, _, err, data = run_probe(site["work"], [
        "llava.eval.model_vqa_loader", *flags, "--model-path", site["model"],
        "--image-folder", site["images"], "--question-file", site["vqa"],
        "--answers-file", answers, "--temperature", "0", "--max_new_tokens", "4"],
        pythonpath=site["site"])
    assert rc == 0, err[-3000:]
    assert data["llava_file"].startswith(site["site"])      # the patched copy ran
    records = data["records"]
    assert len(records) == 3
    for r in records:
        assert r["prefill"] == r["prompt"] - 1 + keep, r
        # no GPU visible: the patched builder fell back to CPU float32, images follow the model
        assert (r["dtype"], r["device"], r["images"]) == ("torch.float32", "cpu", "torch.float32")
        assert r["kept"] == ([keep] if flags else [])
    rows = _answers(answers)
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2"]
    assert all(isinstance(r["text"], str) for r in rows)


def test_patched_model_vqa_science(site):
    answers = os.path.join(site["work"], "sqa.jsonl")
    rc, _, err, data = run_probe(site["work"], [
        "llava.eval.model_vqa_science", "--pruning", "mix", "--keep", "24",
        "--pruning-args", "ratio=0.5", "--model-path", site["model"],
        "--image-folder", site["images"], "--question-file", site["sqa"],
        "--answers-file", answers, "--conv-mode", "vicuna_v1", "--temperature", "0"],
        pythonpath=site["site"])
    assert rc == 0, err[-3000:]
    assert [r["prefill"] - r["prompt"] + 1 for r in data["records"]] == [24, 24, 24]
    assert len(_answers(answers)) == 3


def test_patched_builder_takes_pruning(site):
    script = (
        "import json, sys\n"
        "from llava.model.builder import load_pretrained_model\n"
        "tok, model, proc, ctx = load_pretrained_model(sys.argv[1], None, 'tiny-llava-v1.5', "
        "pruning={'method': 'attention', 'keep': 10})\n"
        "tok, plain, proc, ctx = load_pretrained_model(sys.argv[1], None, 'tiny-llava-v1.5')\n"
        "print(json.dumps({'file': sys.modules['llava.model.builder'].__file__, "
        "'config': model.agile_config.to_dict(), 'dtype': str(model.dtype), "
        "'plain': hasattr(plain, 'agile_config')}))\n")
    env = dict(os.environ, PYTHONPATH=site["site"], CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", script, site["model"]], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(site["site"])
    assert out["config"]["method"] == "attention" and out["config"]["keep"] == 10
    assert out["dtype"] == "torch.float32" and out["plain"] is False


@pytest.mark.parametrize("flags,needle", [(["--pruning", "bogus"], "unknown pruning method"),
                                          (["--pruning", "fps", "--keep", "0"], "keep must be >= 1")])
def test_patched_module_bad_flags_one_line(site, flags, needle):
    env = dict(os.environ, PYTHONPATH=site["site"], PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_loader", *flags],
                          capture_output=True, text=True, env=env, timeout=300, cwd=site["work"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], proc.stderr


def test_checkout_layout_and_enclosing_git_repo(tmp_path):
    # a checkout (folder holding llava/) that is itself a git repository
    checkout = tmp_path / "LLaVA"
    copy_llava(str(checkout / "llava"))
    subprocess.run(["git", "init", "-q", str(checkout)], check=True)
    proc = apply(checkout)
    assert proc.returncode == 0 and "(checkout)" in proc.stdout, proc.stderr
    assert "parse_args_with_pruning" in (checkout / "llava/eval/model_vqa.py").read_text()
    # an installed package inside some other git repository (e.g. a venv in a project)
    outer = tmp_path / "project"
    pkg = copy_llava(str(outer / ".venv" / "site-packages" / "llava"))
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    proc = apply(pkg)
    assert proc.returncode == 0 and "installed llava/ package" in proc.stdout, proc.stderr
    assert "parse_args_with_pruning" in open(os.path.join(pkg, "eval/run_llava.py")).read()


def test_modified_tree_is_refused_and_left_alone(tmp_path):
    pkg = copy_llava(str(tmp_path / "llava"))
    with open(os.path.join(pkg, "eval/model_vqa.py"), "a") as f:
        f.write("# a local change\n")
    before = digests(pkg)
    proc = apply(pkg)
    assert proc.returncode == 1
    assert "refusing" in proc.stderr and "llava/eval/model_vqa.py: differs from" in proc.stderr
    assert "llava/eval/model_vqa_loader.py" not in proc.stderr   # only what did not match
    assert digests(pkg) == before


def test_model_file_change_is_refused(tmp_path):
    pkg = copy_llava(str(tmp_path / "llava"))
    arch = os.path.join(pkg, "model/llava_arch.py")
    with open(arch) as f:
        text = f.read()
    with open(arch, "w") as f:
        f.write(text.replace("image_newline", "image_newline ", 1))
    proc = apply(pkg)
    assert proc.returncode == 1 and "llava/model/llava_arch.py: differs" in proc.stderr


def test_half_patched_tree_is_refused(tmp_path, site):
    pkg = str(tmp_path / "llava")
    shutil.copytree(site["pkg"], pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(installed_llava(), "eval/run_llava.py"),
                os.path.join(pkg, "eval/run_llava.py"))
    proc = apply(pkg)
    assert proc.returncode == 1
    assert "llava/eval/run_llava.py: as released" in proc.stderr
    assert "patched (8 of 9 files as patched)" in proc.stderr


def test_unknown_dirs_are_refused(tmp_path):
    proc = apply(tmp_path)
    assert proc.returncode == 1 and "neither a LLaVA checkout" in proc.stderr
    assert apply(tmp_path / "missing").returncode == 2
    assert subprocess.run(["bash", APPLY], capture_output=True).returncode == 2


def test_manifest_covers_every_patch():
    trees = {}
    with open(os.path.join(PATCHES, "MANIFEST")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                tree, path, orig, new = line.split()
                trees.setdefault(tree, {})[path] = (orig, new)
    assert set(trees) == {"llava-v1.2.2.post1", "llava-c121f04", "fastervlm-f5d5f12"}
    for tree, files in trees.items():
        with open(os.path.join(PATCHES, f"{tree}.patch")) as f:
            text = f.read()
        touched = set(re.findall(r"^\+\+\+ b/(\S+)", text, re.M))
        assert touched == {p for p, (o, n) in files.items() if o != n}
        # small patches: the work is done in llava_agile
        for chunk in re.split(r"^diff --git ", text, flags=re.M)[1:]:
            added = [l for l in chunk.splitlines() if l.startswith("+") and not l.startswith("+++")]
            assert len(added) <= 6, chunk.splitlines()[0]
    with open(os.path.join(installed_llava(), "model/builder.py"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            trees["llava-v1.2.2.post1"]["llava/model/builder.py"][0]


EXTRA = [p for p in os.environ.get("LLAVA_AGILE_TEST_TREES", "").split(os.pathsep) if p]


@pytest.mark.skipif(not EXTRA, reason="set LLAVA_AGILE_TEST_TREES to LLaVA HEAD / FasterVLM "
                                      "checkouts")
@pytest.mark.parametrize("checkout", EXTRA)
def test_other_trees(tmp_path, checkout):
    import py_compile

    dest = tmp_path / "tree"
    shutil.copytree(os.path.join(checkout, "llava"), dest / "llava",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = apply(dest)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"as (llava-c121f04|fastervlm-f5d5f12|llava-v1\.2\.2\.post1)", proc.stdout)
    for rel in PATCHED + ["model/llava_arch.py"]:
        py_compile.compile(str(dest / "llava" / rel), doraise=True,
                           cfile=str(tmp_path / "compiled.pyc"))
    proc = apply(dest)
    assert proc.returncode == 0 and "already patched" in proc.stdout
