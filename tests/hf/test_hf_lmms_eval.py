"""`python -m lmms_eval --model llava_hf_agile` end to end on CPU: the tiny LLaVA-1.5 / LLaVA-NeXT
converted to the llava-hf layout (the same weights as the original-codebase reference), a tiny
local task (generated images in a local parquet; generate_until and multiple_choice).

Runs in .venv-hf (transformers 4.57.6), where `make hf-setup` installs lmms-eval 0.7.3 (--no-deps,
requirements-lmms.txt); lmms-eval's `llava_hf` is tested there only, so .venv-hf5 skips this file.
"""
import glob
import json
import os
import sys

import pytest
import torch
import transformers

if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("lmms-eval's llava_hf route is installed and tested with transformers 4.57.6 "
                "(.venv-hf) only", allow_module_level=True)

import lmms_eval  # noqa: E402,F401  (make hf-setup installs it: a missing install must fail)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lmms_helpers import QUESTION, lmms, samples, write_tasks  # noqa: E402

torch.set_num_threads(1)
KEEP = 16
N_TOKENS = 576
CHOICES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def env(reference, tmp_path_factory):
    from llava_agile.assets import tiny_image
    from llava_agile.hf.convert import convert_original

    root = tmp_path_factory.mktemp("lmms_hf")
    models = {f: convert_original(reference[f]["path"], str(root / f"tiny-{f}-hf"))
              for f in ("llava", "llava_next")}
    sizes = [(300, 200), (200, 320), (336, 336), (420, 260), (260, 260)]
    kinds = ["shapes", "noise", "shapes", "noise", "flat"]
    images = [tiny_image(i, s, k) for i, (s, k) in enumerate(zip(sizes, kinds))]
    tasks = write_tasks(root, images, ["red", "green", "blue", "red", "blue"])
    return {"root": root, "models": models, "tasks": tasks, "docs": len(sizes),
            "images": images, "hf_home": str(root / "hf")}


def run(env, name, model_args, tasks="tiny_agile_gen,tiny_agile_mc", model="llava_hf_agile",
        family="llava", extra=()):
    out = env["root"] / name
    rc, log, res = lmms(env, out, f"pretrained={env['models'][family]},{model_args}",
                        tasks=tasks, model=model, extra=extra)
    assert rc == 0 and res is not None, log[-4000:]
    return out, res


def agile_stats(out):
    (folder,) = glob.glob(os.path.join(str(out), "*"))
    with open(os.path.join(folder, "agile_stats.json")) as f:
        return json.load(f)


def vicuna(question, answer=None):
    """lmms-eval llava_hf's Vicuna fallback template (the tiny tokenizer has none)."""
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE
    from jinja2 import Template

    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return Template(VICUNA_CHAT_TEMPLATE).render(messages=messages, eos_token="</s>",
                                                 add_generation_prompt=answer is None)


def text_tokens(model_path, answer=None):
    """Prompt tokens besides the image (with a multiple-choice continuation: its tokens too)."""
    from transformers import AutoProcessor

    ids = AutoProcessor.from_pretrained(model_path)(text=vicuna(QUESTION, answer),
                                                    return_tensors="pt")
    return ids["input_ids"].shape[1] - 1  # one <image> before expansion


@pytest.fixture(scope="module")
def pruned(env):
    return run(env, "out-pruned", f"pruning=adaptive,keep={KEEP},"
                                  f"pruning_args=\"erank_avg=90;tau_max=0.3\"")


def test_llava_pruned_prefill_mc_and_stats(env, pruned):
    out, res = pruned
    assert "exact_match,none" in res["results"]["tiny_agile_gen"]
    assert "pruning=adaptive" in res["config"]["model_args"]
    text = text_tokens(env["models"]["llava"])
    rows = samples(out, "tiny_agile_gen")
    assert sorted(r["doc_id"] for r in rows) == list(range(env["docs"]))
    for r in rows:  # prefill = text + K per image
        (tc,) = r["token_counts"]
        assert tc["input_tokens"] == text + KEEP and 0 <= tc["output_tokens"] <= 4, tc
    assert res["efficiency"]["by_task"]["tiny_agile_gen"]["total_input_tokens"] == \
        env["docs"] * (text + KEEP)
    mc = samples(out, "tiny_agile_mc")
    for r in mc:  # lmms-eval picks the choice with the lowest loss
        losses = [float(loss) for loss, _ in r["filtered_resps"]]
        assert len(losses) == 3 and all(loss > 0 for loss in losses)
        assert r["acc"] == float(CHOICES[losses.index(min(losses))] == r["target"])
    stats = agile_stats(out)
    assert stats["model"] == "llava_hf_agile" and stats["pruning"]["keep"] == KEEP
    gen, mcs = stats["summary"]["tiny_agile_gen"], stats["summary"]["tiny_agile_mc"]
    assert gen["images"] == env["docs"] and mcs["images"] == 3 * env["docs"]
    assert gen["kept_per_image_min"] == gen["kept_per_image_max"] == KEEP
    assert mcs["kept_per_image_min"] == mcs["kept_per_image_max"] == KEEP


def test_pruning_none_matches_llava_hf_and_masks_the_context(env):
    """`pruning=none`: generate_until answers equal lmms-eval's own `llava_hf` on the same model
    (its simple class, which ours follows: `--force_simple`; 0.7.3's default is a chat variant);
    each multiple-choice loss is the mean over the continuation's tokens only (all 576
    placeholders and the text of the context masked), recomputed here with the plain model.
    The answers are compared exactly because they are equal by construction, so round-off cannot
    decide them on any CPU: `pruning=none` runs the same class, dtype, attention kernel and batch
    as `llava_hf` and hands every image feature on unchanged; the recomputed losses, a different
    call, are compared within a tolerance."""
    ours, res = run(env, "out-none", "pruning=none,dtype=float32")
    theirs, _ = run(env, "out-llava-hf", "dtype=float32,device_map=cpu", tasks="tiny_agile_gen",
                    model="llava_hf", extra=["--force_simple"])
    a, b = samples(ours, "tiny_agile_gen"), samples(theirs, "tiny_agile_gen")
    text = text_tokens(env["models"]["llava"])
    assert all(r["token_counts"][0]["input_tokens"] == text + N_TOKENS for r in a)
    assert {r["doc_id"]: r["filtered_resps"] for r in a} == \
        {r["doc_id"]: r["filtered_resps"] for r in b}

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = env["models"]["llava"]
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(path)
    mc = {r["doc_id"]: r for r in samples(ours, "tiny_agile_mc")}
    for doc in (0, 1):
        image = env["images"][doc].convert("RGB")
        context = proc(text=vicuna(QUESTION), images=[image], return_tensors="pt")
        n = context["input_ids"].shape[1]
        for choice, (logged, _) in zip(CHOICES, mc[doc]["filtered_resps"]):
            # lmms-eval's continuation: target_delimiter (" ") + choice
            inputs = proc(text=vicuna(QUESTION, " " + choice), images=[image], return_tensors="pt")
            labels = inputs["input_ids"].clone()
            labels[:, :n] = -100
            with torch.no_grad():
                loss = float(model(**inputs, labels=labels).loss)
            assert float(logged) == pytest.approx(loss, rel=1e-4), (doc, choice)


def test_variable_k_through_llava_agile_generate(env):
    """adaptive_count=True: K per image is known only after the tower; generate_until goes
    through llava_agile.generate, loglikelihood through its prepare; the prefill of every
    request is the text plus that image's own K."""
    out, res = run(env, "out-count", "pruning=adaptive,keep=32,"
                                     "pruning_args=\"adaptive_count=true;erank_avg=43\"")
    stats = agile_stats(out)
    path = env["models"]["llava"]
    text = {"tiny_agile_gen": [text_tokens(path)],
            "tiny_agile_mc": [text_tokens(path, " " + c) for c in CHOICES]}
    kept = {}
    for s in stats["samples"]:
        kept.setdefault((s["task"], s["doc_id"]), []).append(s["kept"][0])
    for task in ("tiny_agile_gen", "tiny_agile_mc"):
        for r in samples(out, task):
            ks = kept[(task, r["doc_id"])]  # the same image: the same K for every choice
            assert len(ks) == len(text[task]) and len(set(ks)) == 1, ks
            assert [tc["input_tokens"] for tc in r["token_counts"]] == \
                [t + ks[0] for t in text[task]]
    ks = {s["kept"][0] for s in stats["samples"]}
    assert len(ks) > 1 and all(k < N_TOKENS for k in ks), ks
    for r in samples(out, "tiny_agile_mc"):
        assert all(float(loss) > 0 for loss, _ in r["filtered_resps"])


def test_llava_next_shared_mode(env):
    """LLaVA-NeXT, anyres_mode=shared (data-dependent counts): results written, every prompt
    shorter than the unpruned one and longer than the text plus the kept patches."""
    out, _ = run(env, "out-next", f"pruning=diversity,keep={KEEP},"
                                  f"pruning_args=\"anyres_mode=shared\"", family="llava_next",
                 tasks="tiny_agile_gen")
    stats = agile_stats(out)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(env["models"]["llava_next"])
    text = text_tokens(env["models"]["llava_next"])
    prefill = {s["doc_id"]: (s["prefill"], s["kept"][0]) for s in stats["samples"]}
    for doc, image in enumerate(env["images"]):
        full = proc(text=vicuna(QUESTION), images=[image.convert("RGB")],
                    return_tensors="pt")["input_ids"].shape[1]
        got, kept = prefill[doc]
        assert text + kept < got < full, (doc, got, kept, full)


@pytest.mark.parametrize("bad,message", [
    ("pruning=nosuch", "unknown pruning method 'nosuch'"),
    ("pruning=adaptive,keep=0", "keep must be >= 1"),
    ("keep=32", "keep given without pruning=METHOD"),
    ("pruning=adaptive,kepp=32", "unknown --model_args kepp"),
    ("pruning=adaptive,batch_size=2", "--batch_size must be 1"),
])
def test_bad_model_args_one_clear_error(bad, message):
    from lmms_eval.models import get_model

    cls = get_model("llava_hf_agile")
    assert cls.__name__ == "LlavaHfAgile"
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        cls.create_from_arg_string(f"pretrained=/nonexistent,{bad}", {"device": "cpu"})


def test_in_llm_method_generates_and_refuses_the_loss(env):
    """FastV inside the LLM through `--model llava_hf_agile`: the processor and the LLM's
    prefill keep every placeholder (they leave between the decoder layers: the tiny LLaMA has 2,
    so before layer 1); a multiple-choice loss is refused in one clear line."""
    out, res = run(env, "out-fastv", 'pruning=fastv,keep=24,pruning_args="layer=1"',
                   tasks="tiny_agile_gen")
    text = text_tokens(env["models"]["llava"])
    for r in samples(out, "tiny_agile_gen"):
        assert r["token_counts"][0]["input_tokens"] == text + N_TOKENS
    gen = agile_stats(out)["summary"]["tiny_agile_gen"]
    assert gen["kept_per_image_min"] == gen["kept_per_image_max"] == 24
    rc, log, _ = lmms(env, env["root"] / "out-fastv-mc",
                      f"pretrained={env['models']['llava']},pruning=fastv,keep=24,"
                      f'pruning_args="layer=1"', tasks="tiny_agile_mc", model="llava_hf_agile")
    assert rc != 0 and "computing a loss is not supported" in log


def test_question_method_reads_each_request(env, reference):
    """CDPruner through `--model llava_hf_agile`: the question read from the prompt of each
    generation and each multiple-choice forward (the continuation after ASSISTANT: is cut)."""
    text_tower = reference["llava"]["text_tower"]
    out, _ = run(env, "out-cdpruner", f"pruning=cdpruner,keep={KEEP},"
                                      f"pruning_args=\"text_tower={text_tower}\"")
    text = text_tokens(env["models"]["llava"])
    for r in samples(out, "tiny_agile_gen"):
        assert r["token_counts"][0]["input_tokens"] == text + KEEP
    records = agile_stats(out)["samples"]
    assert {r["task"] for r in records} == {"tiny_agile_gen", "tiny_agile_mc"}
    assert all(r["questions"] == [QUESTION] * r["images"] for r in records)


def test_llava_next_question_method(env, reference):
    """LLaVA-NeXT with CDPruner (`global` mode, K cells + newlines per image) through
    `--model llava_hf_agile`: every image is pruned and gets its request's question."""
    text_tower = reference["llava_next"]["text_tower"]
    out, _ = run(env, "out-next-cdpruner", f"pruning=cdpruner,keep={KEEP},pruning_args="
                                           f"\"anyres_mode=global;text_tower={text_tower}\"",
                 family="llava_next", tasks="tiny_agile_gen")
    records = agile_stats(out)["samples"]
    assert len(records) == env["docs"]
    assert all(r["questions"] == [QUESTION] and r["kept"] == [KEEP] for r in records)
