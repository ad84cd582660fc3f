"""A tiny random LLaMA (transformers 4.37) and one LLaVA-1.5-shaped prompt, shared by the
official-code recorder (`record_official.py`) and the tests that compare with its golden files.

The prompt has LLaVA-1.5's layout, which FastV's and DART's official code hard-code: 35 prompt
tokens, 576 image tokens, then the question. Everything runs in float64 (round-off cannot decide
a choice; the tests also check the margins).
"""
from __future__ import annotations

import torch

PREFIX, IMAGE, TEXT = 35, 576, 20
LENGTH = PREFIX + IMAGE + TEXT
VOCAB = 64


def config(layers: int = 6):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    return cfg


def weights(seed: int = 0, layers: int = 6) -> dict:
    """A state dict for `LlamaModel(config(layers))`; q/k scaled x6 so that attention is peaked
    (at init every token receives nearly the same attention)."""
    from transformers import LlamaModel
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)   # the same draws whatever the caller's default
    try:
        model = LlamaModel(config(layers)).double()
    finally:
        torch.set_default_dtype(default)
    sd = model.state_dict()
    for k in sd:
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            sd[k] = sd[k] * 6
    return sd


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds `[1, LENGTH, 64]`, the token embedding / LM-head matrix `[VOCAB, 64]`)."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(1, LENGTH, 64, generator=g, dtype=torch.float64)
    return x, torch.randn(VOCAB, 64, generator=g, dtype=torch.float64)


def record_layers(model):
    """Hooks that record every decoder layer's input and output hidden states (last call)."""
    seen = {}

    def pre(i):
        return lambda mod, args, kwargs: seen.__setitem__(("in", i), (args[0] if args else
                                                                       kwargs["hidden_states"]))

    def post(i):
        return lambda mod, args, out: seen.__setitem__(("out", i), out[0])

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i)))
    return seen, handles


def kept_positions(seen: dict, layers: int) -> dict:
    """{layer: original positions of the tokens it saw} wherever a layer saw fewer tokens than
    the previous one (rows matched exactly: pruning copies rows)."""
    cur = list(range(seen[("in", 0)].shape[1]))
    out = {}
    for i in range(1, layers):
        prev, now = seen[("out", i - 1)][0], seen[("in", i)][0]
        if now.shape[0] == prev.shape[0]:
            continue
        rows = []
        for r in now:
            hit = (prev == r).all(-1).nonzero()[:, 0]
            assert len(hit) == 1, "a pruned row must match exactly one row of the previous layer"
            rows.append(int(hit[0]))
        cur = [cur[j] for j in rows]
        out[i] = cur
    return out


def greedy(step, first_hidden: torch.Tensor, embed: torch.Tensor, n: int = 4):
    """Greedy decoding: `step(inputs_embeds)` runs one cached step and returns the last hidden
    state; logits = h @ embedᵀ. Returns (tokens, each step's hidden state)."""
    tokens, hidden, h = [], [], first_hidden
    for _ in range(n):
        tok = int((h @ embed.T).argmax())
        tokens.append(tok)
        h = step(embed[tok][None, None])
        hidden.append(h)
    return tokens, hidden


def prefill_and_greedy(model, x: torch.Tensor, embed: torch.Tensor):
    """A HF `LlamaModel` on `inputs_embeds=x` with its KV cache, then `greedy` decoding with it.
    Returns (the prefill's last hidden state, tokens, each step's hidden state)."""
    out = model(inputs_embeds=x, use_cache=True, return_dict=False)
    cache = [out[1]]

    def step(e):
        o = model(inputs_embeds=e, past_key_values=cache[0], use_cache=True, return_dict=False)
        cache[0] = o[1]
        return o[0][0, -1]
    tokens, hidden = greedy(step, out[0][0, -1], embed)
    return out[0][0, -1], tokens, hidden
