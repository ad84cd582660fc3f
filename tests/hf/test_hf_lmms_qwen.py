"""`python -m lmms_eval --model qwen2_5_vl_agile / qwen3_vl_agile` end to end on CPU: the tiny
random Qwen2.5-VL / Qwen3-VL of test_hf_qwen / test_hf_qwen3 saved with a word-level tokenizer, an
image processor and a chat template, the tiny local task of tests/lmms_helpers.py (generated
images in a local parquet), lmms-eval's own chat path (its ConfigurableMessagesTask, its chat
classes' generate_until, qwen_vl_utils, the processor).

The CLI runs once per module with `--config` (a list of evaluations in one process: each
`python -m lmms_eval` pays ~10 s of imports). Runs in .venv-hf5 (transformers 5.24.0), where
`make hf-setup` installs lmms-eval 0.7.3 with requirements-lmms5.txt; skipped elsewhere.
"""
import os
import sys

import pytest
import torch
import transformers

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the Qwen-VL adapter and its lmms-eval classes need transformers 5.x (.venv-hf5)",
                allow_module_level=True)
pytest.importorskip("lmms_eval", reason="lmms-eval is installed in .venv-hf5 by make hf-setup")
pytest.importorskip("qwen_vl_utils", reason="lmms-eval's Qwen classes import qwen_vl_utils")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lmms_helpers import QUESTION, lmms_config, samples, write_tasks  # noqa: E402
import test_hf_qwen as q25  # noqa: E402  (the tiny models' builders)
import test_hf_qwen3 as q3  # noqa: E402

torch.set_num_threads(1)
KEEP = 6
SIZES = [(112, 112), (168, 112), (140, 112)]   # (w, h) of the task's images
KINDS = ["shapes", "noise", "flat"]
# every id below the vision tokens is a word, so every generated text token shows in the answers
WORDS = q25.WORDS + [f"w{i}" for i in range(len(q25.WORDS) + 3, q25.VSTART)]
TEMPLATE = ("{% for m in messages %}{{ m.role }} {% if m.content is string %}{{ m.content }} "
            "{% else %}{% for c in m.content %}{% if c.type == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|> {% elif c.type == 'text' %}{{ c.text }} "
            "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant"
            "{% endif %}")
FAMILIES = {  # family -> (builders, lmms-eval model, ours, factor of the resize, model_args)
    "q25": (q25, "qwen2_5_vl", "qwen2_5_vl_agile", 28, "min_pixels=3136,max_pixels=50176"),
    "q3": (q3, "qwen3_vl", "qwen3_vl_agile", 32, "")}


def save(family, folder):
    """The tiny model, its tokenizer, image processor and chat template in a checkpoint folder
    (AutoProcessor rebuilds the processor from them, as for a real checkpoint)."""
    mod = FAMILIES[family][0]
    mod.tiny_model().save_pretrained(folder)
    q25.tiny_tokenizer(WORDS).save_pretrained(folder)
    mod.tiny_processor().image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return str(folder)


def args(env, family, more=""):
    extra = FAMILIES[family][4]
    return ",".join(a for a in (f"pretrained={env['models'][family]}", extra, more) if a)


def runs(env):
    """Every evaluation of the module, one CLI process."""
    stats = env["root"] / "stats"
    todo = {}
    for family, (_, stock, ours, _, _) in FAMILIES.items():
        todo[f"{family}-stock"] = dict(model=stock, model_args=args(env, family, "device_map=cpu"))
        todo[f"{family}-none"] = dict(model=ours, model_args=args(
            env, family, f"pruning=none,stats_dir={stats / family}-none"))
    todo["q25-pruned"] = dict(model="qwen2_5_vl_agile", model_args=args(
        env, "q25", f"pruning=adaptive,keep={KEEP},stats_dir={stats}/q25-pruned"))
    todo["q3-pruned"] = dict(model="qwen3_vl_agile", model_args=args(
        env, "q3", f"pruning=diversity,keep={KEEP},stats_dir={stats}/q3-pruned"))
    # K per image from its erank (known after the tower): llava_agile.generate, batches of 2
    todo["q25-count"] = dict(model="qwen2_5_vl_agile", batch_size=2, model_args=args(
        env, "q25", f"pruning=adaptive,keep={KEEP},stats_dir={stats}/q25-count,"
                    f"pruning_args=\"adaptive_count=true;erank_avg=4\""))
    # FastV inside the LLM (the tiny Qwen2.5-VL LLM has 2 layers: it drops before layer 1)
    todo["q25-fastv"] = dict(model="qwen2_5_vl_agile", model_args=args(
        env, "q25", f"pruning=fastv,keep={KEEP},stats_dir={stats}/q25-fastv,"
                    f"pruning_args=\"layer=1\""))
    # a chat class builds generation requests only: lmms-eval refuses the task, as for its own
    todo["q25-mc"] = dict(model="qwen2_5_vl_agile", tasks="tiny_agile_mc",
                          model_args=args(env, "q25", "pruning=none"))
    return todo


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from llava_agile.assets import tiny_image

    root = tmp_path_factory.mktemp("lmms_qwen")
    models = {}
    for family in FAMILIES:
        (root / family).mkdir()
        models[family] = save(family, root / family)
    images = [tiny_image(i, s, k) for i, (s, k) in enumerate(zip(SIZES, KINDS))]
    tasks = write_tasks(root, images, ["red", "green", "blue"])
    env = {"root": root, "models": models, "tasks": tasks, "hf_home": str(root / "hf"),
           "images": images}
    rc, log, res = lmms_config(env, runs(env))
    env.update(rc=rc, log=log, results=res)
    return env


def result(env, name):
    res = env["results"][name]
    assert env["rc"] == 0 and res is not None, env["log"][-6000:]
    return env["root"] / name, res


def agile_stats(env, name):
    import json

    with open(env["root"] / "stats" / name / "agile_stats.json") as f:
        return json.load(f)


def text_tokens(family) -> int:
    """The prompt's tokens besides the image's placeholders: the chat message lmms-eval builds
    (Qwen3-VL's class puts its system prompt first), rendered by the template, one placeholder."""
    from jinja2 import Template

    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    messages = [user]
    if family == "q3":
        messages.insert(0, {"role": "system", "content": [
            {"type": "text", "text": "You are a helpful assistant."}]})
    text = Template(TEMPLATE).render(messages=messages, add_generation_prompt=True)
    return len(q25.tiny_tokenizer(WORDS)(text)["input_ids"]) - 1


def image_tokens(family, doc) -> int:
    """Merged tokens of the task's image as qwen_vl_utils resizes it (a multiple of the factor;
    the processors keep that size)."""
    from qwen_vl_utils import smart_resize

    factor = FAMILIES[family][3]
    w, h = SIZES[doc]
    h2, w2 = smart_resize(h, w, factor=factor)
    return (h2 // factor) * (w2 // factor)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruning_none_equals_lmms_evals_own_class(env, family):
    """`pruning=none`: the answers of lmms-eval's own `qwen2_5_vl` / `qwen3_vl` on the same
    checkpoint, compared exactly: equal by construction (the same class's request handling,
    bfloat16 load, kernels and batch; the adapter hands every image feature on unchanged);
    input_tokens = the text plus every merged token of the image."""
    ours, res = result(env, f"{family}-none")
    theirs, _ = result(env, f"{family}-stock")
    a, b = samples(ours, "tiny_agile_gen"), samples(theirs, "tiny_agile_gen")
    assert sorted(r["doc_id"] for r in a) == list(range(len(SIZES)))
    assert {r["doc_id"]: r["filtered_resps"] for r in a} == \
        {r["doc_id"]: r["filtered_resps"] for r in b}
    assert any(r["filtered_resps"] != [""] for r in a)  # the answers say something
    text = text_tokens(family)
    for r in a:
        (tc,) = r["token_counts"]
        (stock,) = {x["doc_id"]: x for x in b}[r["doc_id"]]["token_counts"]
        assert tc["input_tokens"] == text + image_tokens(family, r["doc_id"]), (r["doc_id"], tc)
        assert tc["output_tokens"] == stock["output_tokens"] and "input_tokens" not in stock
    stats = agile_stats(env, f"{family}-none")
    assert stats["pruning"]["method"] == "none"
    assert {s["doc_id"]: s["kept"] for s in stats["samples"]} == \
        {doc: [image_tokens(family, doc)] for doc in range(len(SIZES))}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_prefill_is_text_plus_k(env, family):
    out, res = result(env, f"{family}-pruned")
    assert "exact_match,none" in res["results"]["tiny_agile_gen"]
    text = text_tokens(family)
    rows = samples(out, "tiny_agile_gen")
    assert sorted(r["doc_id"] for r in rows) == list(range(len(SIZES)))
    for r in rows:  # prefill = text + K per image
        (tc,) = r["token_counts"]
        assert tc["input_tokens"] == text + KEEP and 0 <= tc["output_tokens"] <= 4, tc
    assert res["efficiency"]["by_task"]["tiny_agile_gen"]["total_input_tokens"] == \
        len(SIZES) * (text + KEEP)
    stats = agile_stats(env, f"{family}-pruned")
    assert stats["model"] == FAMILIES[family][2] and stats["pruning"]["keep"] == KEEP
    gen = stats["summary"]["tiny_agile_gen"]
    assert gen["images"] == len(SIZES) and gen["requests"] == len(SIZES)
    assert gen["kept_per_image_min"] == gen["kept_per_image_max"] == KEEP
    assert gen["prefill_tokens_mean"] == text + KEEP


def test_variable_k_batched_through_llava_agile_generate(env):
    """adaptive_count=True, --batch_size 2: each request's prefill is the text plus its own
    image's K (the batch's rows matched to their requests), K < N and not one value for all."""
    out, _ = result(env, "q25-count")
    kept = {s["doc_id"]: s["kept"] for s in agile_stats(env, "q25-count")["samples"]}
    text = text_tokens("q25")
    for r in samples(out, "tiny_agile_gen"):
        (k,) = kept[r["doc_id"]]
        assert 1 <= k < image_tokens("q25", r["doc_id"])
        assert r["token_counts"][0]["input_tokens"] == text + k, (r["doc_id"], k)
    assert len(set(k for (k,) in kept.values())) > 1, kept


def test_in_llm_method_keeps_the_placeholders_and_prunes_in_the_llm(env):
    """FastV through `--model qwen2_5_vl_agile`: the processor and the LLM's prefill keep every
    image token (they leave between the decoder layers); K of them stay after layer 1."""
    out, _ = result(env, "q25-fastv")
    text = text_tokens("q25")
    for r in samples(out, "tiny_agile_gen"):
        assert r["token_counts"][0]["input_tokens"] == text + image_tokens("q25", r["doc_id"])
    gen = agile_stats(env, "q25-fastv")["summary"]["tiny_agile_gen"]
    assert gen["images"] == len(SIZES)
    assert gen["kept_per_image_min"] == gen["kept_per_image_max"] == KEEP


def test_multiple_choice_is_lmms_evals_own_refusal(env):
    """Chat classes get generation requests only (lmms-eval's ConfigurableMessagesTask);
    loglikelihood stays lmms-eval's NotImplementedError."""
    assert env["results"]["q25-mc"] is None
    assert "Currently messages is used for generation only" in env["log"]


@pytest.fixture(scope="module")
def loaded(env):
    """qwen2_5_vl_agile built as the CLI builds it, in this process (float32)."""
    from lmms_eval.models import get_model

    cls = get_model("qwen2_5_vl_agile")
    return cls.create_from_arg_string(args(env, "q25", f"pruning=adaptive,keep={KEEP},"
                                                       f"dtype=float32"),
                                      {"batch_size": 1, "device": "cpu"})


def test_dtype_device_and_loglikelihood(loaded):
    assert loaded.model.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert loaded.device_map == "cpu" and loaded.rank == 0 and loaded.is_simple is False
    with pytest.raises(NotImplementedError):
        loaded.loglikelihood([])


def test_videos_are_refused(loaded):
    """A request whose messages hold a video: one clear error before any decoding (called
    below the fail-fast wrapper, which would end this process)."""
    from lmms_eval.api.instance import Instance

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "video", "url": "/nonexistent/clip.mp4"},
                                             {"type": "text", "text": QUESTION}]}]

    loaded.task_dict = {"t": {"test": [{}]}}
    req = Instance(request_type="generate_until", idx=0,
                   arguments=("ctx", doc_to_messages, {"max_new_tokens": 2}, 0, "t", "test"),
                   metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(ValueError, match="qwen2_5_vl_agile prunes images; this task gives videos"):
        loaded._generate_until([req])


@pytest.mark.parametrize("bad,message", [
    ("pruning=nosuch", "unknown pruning method 'nosuch'"),
    ("pruning=adaptive,keep=0", "keep must be >= 1"),
    ("keep=32", "keep given without pruning=METHOD"),
    ("pruning=adaptive,kepp=32", r"unknown --model_args kepp; accepted: pretrained, pruning, .*"
                                 r"min_pixels"),
    ("pruning=adaptive,dtype=float64", "dtype must be one of"),
    ("pruning=adaptive,device_map=cpu", "device_map must be 'auto'"),
    ("pruning=adaptive,batch_size=0", "--batch_size must be an integer >= 1"),
])
def test_bad_model_args_one_clear_error(bad, message):
    from lmms_eval.models import get_model

    cls = get_model("qwen2_5_vl_agile")
    assert cls.__name__ == "Qwen2_5_VLAgile"
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        cls.create_from_arg_string(f"pretrained=/nonexistent,{bad}", {"device": "cpu"})


def test_wrong_family_and_auto_on_cpu(env):
    from lmms_eval.models import get_model

    with pytest.raises(ValueError, match="is a 'qwen3_vl' model; qwen2_5_vl_agile takes "
                                         "qwen2_5_vl checkpoints"):
        get_model("qwen2_5_vl_agile").create_from_arg_string(
            f"pretrained={env['models']['q3']}", {"device": "cpu"})
    with pytest.raises(ValueError, match="device_map=auto .* needs a GPU"):
        get_model("qwen3_vl_agile").create_from_arg_string(
            f"pretrained={env['models']['q3']},device_map=auto", {"device": "cpu"})
    with pytest.raises(ValueError, match="fastv prunes inside the LLM, and Qwen3-VL's deepstack"):
        get_model("qwen3_vl_agile").create_from_arg_string(
            f"pretrained={env['models']['q3']},pruning=fastv,keep=4", {"device": "cpu"})
