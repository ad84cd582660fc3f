"""The question-conditioned methods where their official code computes NaN, and their errors.

(Equality with the official code: tests/official/test_selection_official.py.)"""
import pytest
import torch

from llava_agile import prune, select_tokens

torch.set_num_threads(1)


def embeds(n=12, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, e, generator=g, dtype=torch.float64),
            torch.randn(2, e, generator=g, dtype=torch.float64))


def test_cdpruner_beyond_the_kernel_rank_fills_by_relevance():
    from llava_agile.methods.cdpruner import relevance

    image, text = embeds()
    x = torch.randn(12, 2, dtype=torch.float64)  # rank 2: the official repeats NaN picks
    res = prune(x, torch.ones(12, dtype=torch.float64), 6, "cdpruner", image_embeds=image,
                text_embeds=text)
    st = res.stats[0]
    assert st["dpp_steps"] <= 2 and res.indices.numel() == 6 == res.indices.unique().numel()
    r = relevance(image[None], [text])[0]
    first = set(select_tokens(x, torch.ones(12, dtype=x.dtype), st["dpp_steps"], "cdpruner",
                              image_embeds=image, text_embeds=text).tolist())
    rest = [i for i in torch.sort(r, descending=True, stable=True).indices.tolist()
            if i not in first][:6 - len(first)]
    assert res.indices.tolist() == sorted(first | set(rest))


def test_cdpruner_zero_norm_tokens_and_constant_relevance_give_no_nan():
    image, text = embeds()
    x = torch.randn(12, 16, dtype=torch.float64)
    x[3] = 0
    idx = select_tokens(x, torch.ones(12, dtype=x.dtype), 5, "cdpruner", image_embeds=image,
                        text_embeds=text)
    assert 3 not in idx.tolist() and idx.numel() == 5
    same = image[:1].expand(12, -1)  # every token equally relevant: max == min
    idx = select_tokens(x, torch.ones(12, dtype=x.dtype), 5, "cdpruner", image_embeds=same,
                        text_embeds=text)
    assert idx.numel() == 5 == idx.unique().numel()


@pytest.mark.parametrize("kwargs,match", [
    (dict(), r"conditioned on the question: pass image_embeds"),
    (dict(image_embeds=torch.randn(12, 8)), r"conditioned on the question"),
    (dict(image_embeds=torch.randn(12, 8), text_embeds=torch.randn(2, 7)),
     r"E = 8 as image_embeds"),
    (dict(image_embeds=torch.randn(12, 8), text_embeds=torch.randn(0, 8)), r"M >= 1"),
    (dict(image_embeds=torch.randn(11, 8), text_embeds=torch.randn(2, 8)), r"image_embeds shape"),
    (dict(image_embeds=torch.randn(12, 8), text_embeds=torch.full((2, 8), float("nan"))),
     r"text_embeds contains NaN"),
    (dict(image_embeds=torch.randn(12, 8), text_embeds=torch.randn(2, 8), scope="row"),
     r"scope must be one of batch, image"),
])
def test_cdpruner_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_tokens(torch.randn(12, 16), torch.rand(12), 4, "cdpruner", **kwargs)


def test_cdpruner_one_question_per_image_must_match_the_batch():
    with pytest.raises(ValueError, match=r"list of B such tensors \(B = 3\)"):
        select_tokens(torch.randn(3, 12, 16), torch.rand(3, 12), 4, "cdpruner",
                      image_embeds=torch.randn(3, 12, 8), text_embeds=[torch.randn(2, 8)] * 2)


def test_trim_with_nothing_kept_gives_the_mean_token_only():
    image, text = embeds()
    x = torch.randn(12, 16, dtype=torch.float64)
    a = torch.ones(12, dtype=x.dtype)
    res = prune(x, a, 1, "trim", image_embeds=image, text_embeds=text[:1])
    torch.testing.assert_close(res.features, x.mean(0, keepdim=True))
    flat = image[:1].expand(12, -1)  # equal scores: no token above the fence (official: crash)
    res = prune(x, a, 4, "trim", image_embeds=flat, text_embeds=text[:1], count="iqr")
    assert res.stats[0]["outliers"] == 0 and res.features.shape == (1, 16)


def test_trim_takes_one_text_row():
    with pytest.raises(ValueError, match=r"trim takes one text embedding per image"):
        prune(torch.randn(12, 16), torch.rand(12), 4, "trim", image_embeds=torch.randn(12, 8),
              text_embeds=torch.randn(2, 8))


@pytest.mark.parametrize("method", ["cdpruner", "trim"])
def test_one_text_in_a_list_serves_every_image(method):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 12, 16, generator=g, dtype=torch.float64)
    image = torch.randn(3, 12, 8, generator=g, dtype=torch.float64)
    text = torch.randn(1, 8, generator=g, dtype=torch.float64)
    a = torch.ones(3, 12, dtype=torch.float64)
    one = prune(x, a, 4, method, image_embeds=image, text_embeds=[text])
    every = prune(x, a, 4, method, image_embeds=image, text_embeds=text)
    assert torch.equal(one.features, every.features)
