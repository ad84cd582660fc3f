"""cdpruner and trim in LLaVA's own model: the question read from the prompt, a CLIP text tower
loaded offline, and the same choice as the tensor API on the tower's own outputs."""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("llava")

import llava_agile  # noqa: E402
from llava_agile.assets import build_tiny_llava, load_tiny, tiny_image, tiny_prompt  # noqa: E402
from llava_agile.assets.tiny import build_tiny_text_tower  # noqa: E402
from llava_agile.llava import compat  # noqa: E402
from llava_agile.llava.attention import ClsAttentionHook, attention_module  # noqa: E402
from llava_agile.text import TextTower, question_from_prompt  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402

N = 576
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    path = build_tiny_llava(str(root))
    text = build_tiny_text_tower(f"{path}/clip-vision", str(root / "clip-text"))
    tokenizer, model, processor, _ = load_tiny(path)
    compat.shim_generation(model)
    seen = []
    model.get_model().register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("inputs_embeds")), with_kwargs=True)
    yield dict(path=path, text=text, tokenizer=tokenizer, model=model, processor=processor,
               seen=seen)
    llava_agile.disable(model)


def run(t, ids, images, mask=None):
    t["seen"].clear()
    with torch.inference_mode():
        t["model"].generate(ids, images=images, attention_mask=torch.ones_like(ids) if mask is None
                            else mask, do_sample=False, max_new_tokens=1, use_cache=True)
    return t["seen"][0].shape[1]


def expected(t, x, method, keep, questions, space="projected"):
    """The tensor API on the model's own tower outputs and the text tower's embeddings."""
    model = t["model"]
    tower = model.get_vision_tower()
    hook = ClsAttentionHook(attention_module(tower))
    hook.start()
    with torch.inference_mode():
        clip = tower(x)
    attn = hook.stop()
    hook.remove()
    tt = TextTower(t["text"], "cpu")
    with torch.inference_mode():
        feats = model.get_model().mm_projector(clip) if space == "projected" else clip
        res = llava_agile.prune(feats, attn, keep, method, image_embeds=tt.embed_patches(clip),
                                text_embeds=[tt.embed_text(q, method) for q in questions])
    return res


@pytest.mark.parametrize("method,keep", [("cdpruner", 32), ("trim", 20)])
def test_question_methods_read_the_prompt_and_match_the_tensor_api(tiny, method, keep):
    t = tiny
    x = process_images([tiny_image(0)], t["processor"], t["model"].config)
    ids = tiny_prompt(t["tokenizer"],
                      QUESTION + "\nAnswer the question using a single word or phrase.")
    full = run(t, ids, x)
    llava_agile.enable(t["model"], method, keep, text_tower=t["text"])
    try:
        assert run(t, ids, x) == full - N + keep  # text + K (trim: K - 1 tokens + their mean)
        (st,) = t["model"].agile_stats
        # cdpruner drops the answer-format line as its official loader does; trim keeps it
        q = QUESTION if method == "cdpruner" else \
            QUESTION + "\nAnswer the question using a single word or phrase."
        ref = expected(t, x, method, keep, [q], "projected" if method == "cdpruner" else "vision")
        key = "indices" if method == "cdpruner" else "attention_indices"
        want = ref.indices[0].tolist() if method == "cdpruner" else ref.stats[0][key]
        assert st[key] == want
        llava_agile.set_question(t["model"], "a different question about a red dog")
        run(t, ids, x)
        other = t["model"].agile_stats[0][key]
        run(t, ids, x)  # set_question served one call: the prompt's question again
        assert t["model"].agile_stats[0][key] == want and other != want
    finally:
        llava_agile.disable(t["model"])


def test_batch_reads_one_question_per_prompt(tiny):
    t = tiny
    x = process_images([tiny_image(0), tiny_image(1)], t["processor"], t["model"].config)
    a = tiny_prompt(t["tokenizer"], QUESTION)[0]
    b = tiny_prompt(t["tokenizer"], "Is there a red square on the left?")[0]
    width = max(len(a), len(b))
    pad = t["tokenizer"].pad_token_id or 0
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in (a, b)])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))])
                        for r in (a, b)]).long()
    llava_agile.enable(t["model"], "cdpruner", 16, text_tower=t["text"], scope="image")
    try:
        t["tokenizer"].padding_side = "left"
        run(t, ids, x, mask)
        got = [st["indices"] for st in t["model"].agile_stats]
        ref = expected(t, x, "cdpruner", 16, [QUESTION, "Is there a red square on the left?"])
        assert got == [i.tolist() for i in ref.indices]
    finally:
        llava_agile.disable(t["model"])


def test_question_errors(tiny):
    t = tiny
    model = t["model"]
    with pytest.raises(ValueError, match=r"cannot load a CLIP text tower"):
        llava_agile.enable(model, "cdpruner", 16)  # the tiny vision tower has no text tower
    with pytest.raises(ValueError, match=r"cannot load a CLIP text tower.*offline"):
        llava_agile.enable(model, "trim", 16, text_tower="/nonexistent/clip")
    with pytest.raises(ValueError, match=r"text_tower is for the question-conditioned methods"):
        llava_agile.enable(model, "adaptive", 16, text_tower=t["text"])
    with pytest.raises(ValueError, match=r"tokenizer= is for the question-conditioned"):
        llava_agile.enable(model, "adaptive", 16, tokenizer=t["tokenizer"])
    llava_agile.enable(model, "adaptive", 16)
    with pytest.raises(ValueError, match=r"set_question is for a model enabled with a question"):
        llava_agile.set_question(model, "what?")
    llava_agile.enable(model, "cdpruner", 16, text_tower=t["text"])
    try:
        x = process_images([tiny_image(0)], t["processor"], model.config)
        with pytest.raises(ValueError, match=r"this call has none: give it with "
                                             r"llava_agile.set_question"):
            model.encode_images(x)
        llava_agile.set_question(model, "what is it?")
        assert model.encode_images(x).shape[1] == 16
        with pytest.raises(ValueError, match=r"non-empty string"):
            llava_agile.set_question(model, "  ")
    finally:
        llava_agile.disable(model)


@pytest.mark.parametrize("text,method,want", [
    ("\nWhat is it?\nAnswer the question using a single word or phrase. ASSISTANT:", "cdpruner",
     "What is it?"),
    ("\nWhat is it?\nAnswer the question using a single word or phrase. ASSISTANT:", "trim",
     "What is it?\nAnswer the question using a single word or phrase."),
    ("\nQ?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly. "
     "ASSISTANT:", "cdpruner", "Q?\nA. x\nB. y"),
    ("\nWhat is shown? [/INST]", "cdpruner", "What is shown?"),
    ("\nDescribe.<|im_end|>\n<|im_start|>assistant\n", "trim", "Describe."),
])
def test_question_from_prompt(text, method, want):
    assert question_from_prompt(text, method) == want


def test_long_questions_are_chunked_or_truncated_as_the_official_codes(tiny):
    tt = TextTower(tiny["text"], "cpu")
    long = "word " * 60  # 301 characters: the tiny tokenizer has no merges
    chunks = (len(tt.tokenizer(long).input_ids) - 1) // 77 + 1
    assert chunks > 1 and tt.embed_text(long, "cdpruner").shape[0] == chunks
    assert tt.embed_text(long, "trim").shape[0] == 1
