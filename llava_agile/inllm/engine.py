"""The one room where image tokens leave the LLM between decoder layers, for every framework.

`Engine` patches the decoder-layer instances of a LLaMA-style language model (ToMe style, no
class or file changed). A framework adapter calls `begin(images, valid)` before each prefill with
where each sample's images sit; the engine then, inside the layer loop the framework runs:

- at a method's score layer, computes what the method ranks by from that layer's input and its
  own modules (`input_layernorm`, `q_proj`, `k_proj`, rotary): the last prompt token's attention
  row or the keys; the LLM itself keeps its attention implementation (SDPA, eager; 2-D
  FlashAttention-2 masks too);
- at a pruning layer, gathers the kept tokens of the hidden states; every later layer gets the
  position ids (original ones, or renumbered for PDrop), 4-D attention mask and cache positions
  of the kept tokens, so each layer's KV cache holds exactly the tokens that layer saw;
- in decoding, maps the mask columns and positions of each layer onto its own (shorter) cache;
- SparseVLM: inserts its merged tokens after each image's kept ones (new rows; their mask rows
  and columns come from the image's last token, causality restored in the new order), scores
  from the raters' attention probabilities in the scored layer, positions renumbered.

Batches: samples keep different numbers of tokens (text-only samples lose none); the shorter ones
get filler entries that nobody attends to (left, or right for right-padded samples).
"""
from __future__ import annotations

import sys
import time
import types

import torch

from . import methods as M


class _Stage:
    """The tokens of the original prefill that one group of layers sees: `alive` `[B, L]` (kept
    ones in their order), or `order` (SparseVLM): per sample its sources in order, original
    positions (< L) or merged tokens (L + v), whose mask rows / columns and positions come from
    a real token, `proxy[b, L + v]` (the image's last position; exact causality is restored in
    the new order, see `_prefill_mask`)."""

    def __init__(self, alive: torch.Tensor | None, valid: torch.Tensor, order=None, proxy=None):
        B, L = valid.shape
        device = valid.device
        self.alive = alive
        if order is None:
            order = [alive[b].nonzero()[:, 0] for b in range(B)]
        width = max(len(o) for o in order)
        right = ~valid[:, -1] & valid[:, 0]  # right-padded samples: fillers go last
        self.gather = torch.zeros(B, width, dtype=torch.long, device=device)
        self.src = torch.zeros(B, width, dtype=torch.long, device=device)
        self.filler = torch.ones(B, width, dtype=torch.bool, device=device)
        self.shift = torch.zeros(B, width, dtype=torch.long, device=device)
        for b in range(B):
            idx = torch.as_tensor(order[b], dtype=torch.long, device=device)
            at = 0 if right[b] else width - len(idx)
            g = idx if proxy is None else proxy[b][idx]
            self.src[b, at:at + len(idx)] = idx
            self.gather[b, at:at + len(idx)] = g
            self.filler[b, at:at + len(idx)] = False
            # renumbering: the k-th entry gets the position of the k-th token (for originals
            # only: the tokens dropped before it)
            self.shift[b, at:at + len(idx)] = g - torch.arange(len(idx), device=device)
        self.total = torch.tensor([L - len(o) for o in order], device=device)  # tokens fewer
        self.length = L
        self.virtual = bool((self.src >= L).any())


class _Run:
    """Bookkeeping of one batch from its prefill on."""

    def __init__(self, images, valid, replay=None):
        self.images = images    # per sample: list of ranges in the padded prefill
        self.valid = valid      # [B, L] real tokens
        self.L = valid.shape[1]
        self.stage = None       # current stage (None: every token)
        self.layer_stage = {}   # layer -> stage it saw (decode)
        self.saved = {}
        self.kept = [[[] for _ in imgs] for imgs in images]  # per image, per stage: kept ones
        self.replay = replay    # alive masks to reuse (no scoring)
        self.replays = []       # alive masks of each pruning layer (what replay() reuses);
                                # SparseVLM: each stage's choices per (sample, image)
        self.margins = []       # each selection's gap at its cut-off (tests check them)
        self.merge_margins = []  # SparseVLM: each clustering's margins (methods.dpc_knn)
        self.raters = {}        # SparseVLM: (sample, image) -> rater positions
        self.proxy = None       # SparseVLM: [B, L + V] the real position behind each source
        self.merged = None      # SparseVLM: per sample, merged tokens made so far
        self.prefill = True
        self.decoded = 0
        self.args = {}          # this forward's arguments per (stage, prefill): shared by layers
        self.ms = 0.0


class Engine:
    def __init__(self, layers, method: str, keep: int, params: dict, norm=None, rope=None,
                 on_prefill=None):
        """`layers`: the decoder layers; `norm`: the model's final norm (DART); `rope`: the
        model's rotary module `rope(x, position_ids) -> (cos, sin)` where the layers get
        precomputed `position_embeddings` (transformers >= 4.48); `on_prefill`: called with
        `stats()` after each pruned prefill."""
        self.layers = list(layers)
        self.method, self.keep = method, keep
        self.params = M.check_params(method, keep, params)
        if method == "pdrop":
            prune = list(self.params["layers"])
            score = prune
        elif method == "sparsevlm":   # scored with layer s's attention, dropped after it
            score = list(self.params["layers"])
            prune = [s + 1 for s in score]
        else:
            prune = [self.params["layer"]]
            score = [self.params["layer"] - 1]
        if prune[-1] >= len(self.layers):
            raise ValueError(f"{method}: pruning layer {prune[-1]} is outside the model's "
                             f"{len(self.layers)} decoder layers (0-{len(self.layers) - 1})")
        if method == "dart" and norm is None:
            raise ValueError("dart needs the model's final norm")
        self.prune_layers, self.score_layers = prune, score
        self.norm = norm
        self.rope = rope
        self.on_prefill = on_prefill
        self.renumber = method in M.RENUMBER
        attn = self.layers[0].self_attn
        impl = getattr(getattr(attn, "config", None), "_attn_implementation", None) or ""
        self.flash = impl.startswith("flash") or "Flash" in type(attn).__name__  # 2-D masks
        self.run: _Run | None = None
        self.last: _Run | None = None
        self._replay = False
        self._saved = []
        for i, layer in enumerate(self.layers):
            orig = layer.forward
            self._saved.append((layer, "forward", layer.__dict__.get("forward")))
            layer.forward = types.MethodType(
                lambda mod, *a, _i=i, _orig=orig, **kw: self._layer(_i, _orig, *a, **kw), layer)
            rope = getattr(layer.self_attn, "rotary_emb", None)
            if not self.renumber and hasattr(rope, "max_seq_len_cached"):
                # transformers 4.37 slices its cos/sin table to the layer's KV length, which is
                # shorter than the largest kept original position: hand it the whole table
                self._saved.append((rope, "forward", rope.__dict__.get("forward")))
                rope.forward = types.MethodType(_whole_table(rope.forward), rope)

    # ------------------------------------------------------------ public

    def begin(self, images: list[list[range]], valid: torch.Tensor):
        """Before a prefill: `images[b]` = ranges of sample b's image tokens in the padded
        sequence; `valid` `[B, L]` = real (non-padding) tokens."""
        replay = None
        if self._replay:
            self._replay = False
            if self.last is None:
                raise RuntimeError("replay() needs an earlier prefill to replay")
            extra = valid.shape[1] - self.last.L
            replay = list(self.last.replays) if self.method == "sparsevlm" else \
                [torch.cat([a, a.new_ones(a.shape[0], extra)], 1) for a in self.last.replays]
        for b, imgs in enumerate(images):
            for r in imgs:
                if not valid[b, r.start:r.stop].all():
                    raise ValueError(f"sample {b}: image tokens {r.start}-{r.stop - 1} overlap "
                                     f"padding")
        if not any(images):   # text only: the layers run untouched
            self.run = self.last = None
            if self.on_prefill is not None:
                self.on_prefill([])
            return
        self.run = _Run(images, valid.bool(), replay)

    def replay(self):
        """Tests: the next prefill (the last prompt plus generated tokens, no KV cache) keeps
        what the last prefill kept at each pruning layer instead of choosing again."""
        self._replay = True

    def stats(self) -> list[list[dict]]:
        """Per sample, per image: the image tokens each layer saw, their mean, the kept ones."""
        run = self.last
        out = []
        for b, imgs in enumerate([] if run is None else run.images):
            rows = []
            for j, r in enumerate(imgs):
                counts, cur, plan = [], len(r), dict(zip(self.prune_layers, run.kept[b][j]))
                for i in range(len(self.layers)):
                    cur = len(plan[i]) if i in plan else cur
                    counts.append(cur)
                first = run.kept[b][j][0] if run.kept[b][j] else list(range(len(r)))
                first = [p for p in first if p >= 0]   # SparseVLM: merged tokens are < 0
                stages = [dict(layer=p, kept=len(k)) for p, k in plan.items()]
                if self.method == "sparsevlm":         # kept: merged ones included
                    for st, k in zip(stages, plan.values()):
                        st["merged"] = sum(1 for p in k if p < 0)
                rows.append(dict(method=self.method, tokens=len(r), kept=len(first),
                                 indices=first, layer_tokens=counts,
                                 avg_tokens=sum(counts) / len(counts), stages=stages,
                                 prune_ms=run.ms / max(1, sum(len(x) for x in run.images))))
            out.append(rows)
        return out

    def remove(self):
        for obj, name, value in self._saved:
            if value is None:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)
        self._saved = []

    # ------------------------------------------------------------ the layer loop

    def _layer(self, i, orig, hidden_states, *args, **kw):
        run = self.run
        if run is None:
            return orig(hidden_states, *args, **kw)
        if args:
            raise RuntimeError("in-LLM pruning needs the decoder layers called with keyword "
                               "arguments (as transformers does outside gradient checkpointing)")
        if i == 0:
            run.args = {}
        if run.prefill:
            if i == 0 and hidden_states.shape[1] != run.L:
                raise RuntimeError(f"in-LLM pruning expected the prefill of {run.L} tokens, got "
                                   f"{hidden_states.shape[1]}")
            sparse = self.method == "sparsevlm"
            if i in self.score_layers or i in self.prune_layers or (sparse and i == 0):
                t0 = time.perf_counter()
                if sparse and i == 0 and run.replay is None:
                    self._raters(hidden_states)
                if sparse and i in self.prune_layers:   # score the sequence after the drop
                    hidden_states = self._prune_sparsevlm(i, hidden_states, kw)
                if i in self.score_layers and run.replay is None:
                    run.saved[i] = self._score(i, hidden_states,
                                               self._args(run.stage, kw, True, hidden_states))
                if not sparse and i in self.prune_layers:
                    hidden_states = self._prune(i, hidden_states, kw)
                run.ms += (time.perf_counter() - t0) * 1e3
            run.layer_stage[i] = run.stage
            if i == len(self.layers) - 1:
                run.prefill = False
                self.last = run
                if self.on_prefill is not None:
                    self.on_prefill(self.stats())
            return orig(hidden_states, **self._args(run.stage, kw, True, hidden_states))
        if i == 0:
            if cache_length(kw) == 0:  # a new prefill nobody announced (e.g. text only)
                self.begin([[]] * hidden_states.shape[0], torch.ones(hidden_states.shape[:2]))
                return orig(hidden_states, *args, **kw)
            run.decoded += hidden_states.shape[1]
        return orig(hidden_states, **self._args(run.layer_stage[i], kw, False, hidden_states))

    # ------------------------------------------------------------ scores and pruning

    def _cur(self, b):
        """(entries of the current sequence that are real tokens, their original positions)."""
        st = self.run.stage
        if st is None:
            ent = self.run.valid[b].nonzero()[:, 0]
            return ent, ent
        ok = ~st.filler[b] & self.run.valid[b].gather(0, st.gather[b])
        ent = ok.nonzero()[:, 0]
        return ent, st.gather[b][ent]

    def _score(self, i, h, kw):
        """What the method ranks by, from layer i's input: per sample with images, the last real
        token's head-mean attention row (FastV, PDrop) or the keys with heads concatenated (DART)
        over the real entries. FastV and DART score with layer K-1 but select before layer K:
        they get a function that reads layer K-1's keys from the KV cache the prefill just
        filled (recomputing them without a cache)."""
        run, layer = self.run, self.layers[i]
        if self.method == "sparsevlm":
            return self._score_sparsevlm(i, h, kw)
        ents = [self._cur(b)[0] if imgs else None for b, imgs in enumerate(run.images)]
        last = torch.tensor([int(e[-1]) if e is not None else 0 for e in ents], device=h.device)
        q = None if self.method == "dart" else _qk(layer, h, kw, last, keys=False)[0]

        def rows(k):
            out = []
            for b, ent in enumerate(ents):
                if ent is None:
                    out.append(None)
                elif self.method == "dart":
                    out.append(k[b].permute(1, 0, 2).reshape(k.shape[2], -1)[ent])
                else:
                    valid = torch.zeros(h.shape[1], dtype=torch.bool, device=h.device)
                    valid[ent] = True
                    out.append(M.attention_row(q[b], k[b], valid)[ent])
            return out

        if self.method == "pdrop":   # this layer's keys of the sequence before the drop
            return rows(_qk(layer, h, kw)[1])
        return lambda later_kw: rows(_cached_keys(layer, later_kw, i, h.shape[1])
                                     if cache_length(later_kw) else _qk(layer, h, kw)[1])

    def _prune(self, i, h, kw):
        run = self.run
        alive = run.stage.alive.clone() if run.stage is not None else torch.ones_like(run.valid)
        if run.replay is not None:
            alive = run.replay[self.prune_layers.index(i)]
            for b, imgs in enumerate(run.images):
                for j, r in enumerate(imgs):
                    run.kept[b][j].append([p - r.start for p in r if alive[b, p]])
        else:
            at = self.score_layers[self.prune_layers.index(i)]
            if callable(run.saved[at]):
                run.saved[at] = run.saved[at](kw)
            saved = run.saved[at]
            states = self.norm(h) if self.method == "dart" else None
            for b, imgs in enumerate(run.images):
                if not imgs:
                    continue
                ent, pos = self._cur(b)
                for j, r in enumerate(imgs):
                    n = len(r)
                    count = dict(M.stages(self.method, self.keep, self.params, n))[i]
                    inside = ((pos >= r.start) & (pos < r.stop)).nonzero()[:, 0]
                    if count >= len(inside):   # a budget larger than the image: keep it all
                        kept = pos[inside].tolist()
                    elif self.method == "dart":
                        kept = self._dart(saved[b], states[b, ent], pos, inside, imgs, count)
                    else:
                        top = M.top_sorted(saved[b][inside], count, run.margins)
                        kept = pos[inside[top]].tolist()
                    drop = torch.ones(run.L, dtype=torch.bool, device=h.device)
                    drop[r.start:r.stop] = False
                    drop[kept] = True
                    alive[b] &= drop
                    run.kept[b][j].append([p - r.start for p in kept])
        run.replays.append(alive)
        new = _Stage(alive, run.valid)
        rel = _inverse(run.stage, h.shape[0], run.L, h.device).gather(1, new.gather)
        rel = rel.masked_fill(new.filler, 0)
        run.stage = new
        return h.gather(1, rel[..., None].expand(-1, -1, h.shape[2]))

    def _dart(self, keys, states, pos, inside, imgs, count):
        """DART in the sample's local (unpadded) coordinates, as its batch-1 code sees them."""
        first, last = int(inside[0]), int(inside[-1])
        if len(inside) != last - first + 1:
            raise RuntimeError("dart expects each image's tokens to be contiguous")
        images = {p for r in imgs for p in r}   # this sample's image positions
        text = [j for j in range(last + 1, len(pos)) if int(pos[j]) not in images]
        pt = self.params["pivot_text"]
        if len(text) < pt:
            raise ValueError(f"dart needs at least pivot_text={pt} text tokens after the image "
                             f"(its text pivots' pool), got {len(text)}")
        local = M.dart_select(keys, states, range(first, last + 1), text,
                              self.params["pivot_image"], pt, count, self.run.margins)
        return pos[local].tolist()

    # ------------------------------------------------------------ SparseVLM

    def _raters(self, h):
        """Per (sample, image): the rater positions, from layer 0's input (the LLM input
        embeddings): of the real non-image tokens after the image (its code: everything after
        the image), those `methods.sparsevlm_raters` picks."""
        run = self.run
        for b, imgs in enumerate(run.images):
            image = torch.zeros(run.L, dtype=torch.bool, device=h.device)
            for r in imgs:
                image[r.start:r.stop] = True
            for j, r in enumerate(imgs):
                text = (run.valid[b] & ~image).nonzero()[:, 0]
                text = text[text >= r.stop]
                pick = M.sparsevlm_raters(h[b, r.start:r.stop], h[b, text]) if len(text) else \
                    text.new_zeros(0, dtype=torch.bool)
                if not pick.any():
                    raise ValueError(f"sparsevlm: sample {b}, image {j}: no rater among the "
                                     f"{len(text)} text tokens after the image (it needs text "
                                     f"after the image, not all alike)")
                run.raters[b, j] = text[pick]

    def _entries(self, b):
        """(sequence indices of sample b's entries, padding included, fillers not; their
        sources; their real positions)."""
        st = self.run.stage
        if st is None:
            ent = torch.arange(self.run.L, device=self.run.valid.device)
            return ent, ent, ent
        ent = (~st.filler[b]).nonzero()[:, 0]
        return ent, st.src[b][ent], st.gather[b][ent]

    def _score_sparsevlm(self, i, h, kw):
        """Layer i's attention probabilities from each image's raters over the image's tokens
        (merged ones included), averaged over heads then raters (`score.attn_postprocess_topk`);
        queries from layer i's input, keys read from its KV cache once it ran."""
        run, layer = self.run, self.layers[i]
        q = _queries(layer, h, kw)
        W = h.shape[1]

        def scores(later_kw):
            k = _cached_keys(layer, later_kw, i, W) if cache_length(later_kw) else \
                _qk(layer, h, kw)[1]
            out = {}
            for b, imgs in enumerate(run.images):
                if not imgs:
                    continue
                ent, src, pos = self._entries(b)
                real = ent[run.valid[b][pos]]
                for j, r in enumerate(imgs):
                    block = ent[(pos >= r.start) & (pos < r.stop)]
                    rows = ent[torch.isin(src, run.raters[b, j])]
                    allowed = torch.zeros(len(rows), W, dtype=torch.bool, device=h.device)
                    allowed[:, real] = True
                    allowed &= torch.arange(W, device=h.device)[None] <= rows[:, None]
                    att = M.rater_attention(q[b][:, rows], k[b], allowed)
                    out[b, j] = att[:, block].mean(dim=0)
            return out
        return scores

    def _prune_sparsevlm(self, i, h, kw):
        """Before layer i (after score layer i - 1): per image keep `min(count, v - 1)` of its v
        tokens by score, cluster the best `int(0.3 * dropped) + 1` dropped ones into
        `int(that / 10) + 1` merged tokens (means of layer i - 1's output rows), put them after the
        image's kept tokens (`modelling_sparse_llama.py` L223-325)."""
        run = self.run
        stage = self.prune_layers.index(i)
        B, W, D = h.shape
        L = run.L
        if run.proxy is None:
            run.proxy = torch.arange(L, device=h.device)[None].repeat(B, 1)
            run.merged = [0] * B
        if run.replay is not None:
            choices = run.replay[stage]
        else:
            at = self.score_layers[stage]
            scores = run.saved[at](kw)
            choices = {}
        inv = _inverse(run.stage, B, run.proxy.shape[1], h.device)

        def key(ext):   # sources as stored (replay): originals >= 0, merged tokens -(v + 1)
            return ext if ext < L else -(ext - L) - 1

        def ext(k):
            return k if k >= 0 else L - k - 1

        orders, rows, made = [], [], []
        before = run.proxy.shape[1]
        for b, imgs in enumerate(run.images):
            ent, src, pos = self._entries(b)
            srcs = src.tolist()
            new_rows = []
            after = {}    # source of an image's last entry -> merged sources to put after it
            gone = set()
            for j, r in enumerate(imgs):
                inside = ((pos >= r.start) & (pos < r.stop)).nonzero()[:, 0]
                block = [srcs[t] for t in inside.tolist()]
                if run.replay is None:
                    sc = scores[b, j]
                    count = min(M.sparsevlm_schedule(self.keep, self.params)[stage],
                                len(block) - 1)
                    top = M.top_sorted(sc, count, run.margins)
                    kept_mask = torch.zeros(len(block), dtype=torch.bool, device=h.device)
                    kept_mask[top] = True
                    dropped = (~kept_mask).nonzero()[:, 0]
                    n1 = int(len(dropped) * 0.3) + 1
                    M.top_sorted(sc[dropped], n1, run.margins)   # its cut-off margin
                    cand = dropped[sc[dropped].topk(n1).indices]   # in topk order
                    clusters = int(n1 / 10) + 1
                    x = h[b, inv[b, src[inside[cand]]]]
                    marg = {}
                    assign = M.dpc_knn(x, clusters, marg)
                    run.merge_margins.append(marg)
                    choice = dict(kept=[key(block[t]) for t in top.tolist()],
                                  cand=[key(block[t]) for t in cand.tolist()],
                                  assign=assign.tolist(), clusters=clusters)
                    choices[b, j] = choice
                else:
                    choice = choices[b, j]
                    cand_src = torch.tensor([ext(k) for k in choice["cand"]], device=h.device)
                    x = h[b, inv[b, cand_src]]
                    assign = torch.tensor(choice["assign"], device=h.device)
                merged = M.merge_clusters(x, assign, choice["clusters"])
                # merged tokens are numbered per sample: sources L + v, v = 0, 1, ...
                new = list(range(L + run.merged[b], L + run.merged[b] + choice["clusters"]))
                run.merged[b] += choice["clusters"]
                if new[-1] >= run.proxy.shape[1]:
                    grow = new[-1] + 1 - run.proxy.shape[1]
                    run.proxy = torch.cat([run.proxy, run.proxy.new_zeros(B, grow)], 1)
                run.proxy[b, new] = r.stop - 1
                kept = {ext(k) for k in choice["kept"]}
                gone |= set(block) - kept
                after[block[-1]] = new
                new_rows.append(merged)
                run.kept[b][j].append([s - r.start if s < L else -(s - L) - 1
                                       for s in block if s in kept] + [-(s - L) - 1 for s in new])
            order = []
            for s in srcs:
                if s not in gone:
                    order.append(s)
                order.extend(after.get(s, []))
            orders.append(order)
            rows.append(torch.cat(new_rows) if new_rows else h.new_zeros(0, D))
            made.append([s for v in after.values() for s in v])
        run.replays.append(choices)
        new = _Stage(None, run.valid, orders, run.proxy)
        out = h.new_zeros(B, new.gather.shape[1], D)
        for b in range(B):   # rows: the current sequence's, then this stage's merged tokens
            where = torch.zeros(run.proxy.shape[1], dtype=torch.long, device=h.device)
            where[:before] = inv[b]
            where[made[b]] = W + torch.arange(len(made[b]), device=h.device)
            take = torch.cat([h[b], rows[b]])[where[new.src[b]]]
            out[b] = take.masked_fill(new.filler[b][:, None], 0)
        run.stage = new
        return out

    # ------------------------------------------------------------ per-layer arguments

    def _rope(self, h, pos):
        if self.rope is None:
            raise RuntimeError("this LLM passes precomputed position embeddings: the engine "
                               "needs its rotary module (rope=) to renumber positions")
        return self.rope(h, pos)

    def _args(self, st: _Stage | None, kw: dict, prefill: bool, h: torch.Tensor) -> dict:
        """A layer's arguments for the tokens of stage `st`. The model hands every layer the same
        mask, positions and cache in one forward, so each stage's are computed once per call."""
        if st is None:
            return kw
        key = (id(st), prefill)
        if key not in self.run.args:
            self.run.args[key] = self._kwargs(st, kw, prefill, h)
        return self.run.args[key]

    def _kwargs(self, st: _Stage, kw: dict, prefill: bool, h: torch.Tensor) -> dict:
        kw = dict(kw)
        B, W = st.gather.shape
        pos = kw.get("position_ids")
        mask = kw.get("attention_mask")
        rope = kw.get("position_embeddings")
        if prefill:
            if pos is not None:
                p = pos.expand(B, -1).gather(1, st.gather)
                if self.renumber:
                    p = p - st.shift
                kw["position_ids"] = p.masked_fill(st.filler, 1)
            if rope is not None:
                kw["position_embeddings"] = self._rope(h, kw["position_ids"]) if self.renumber \
                    else tuple(t.expand(B, -1, -1).gather(
                        1, st.gather[..., None].expand(-1, -1, t.shape[-1])) for t in rope)
            kw["attention_mask"] = _prefill_mask(mask, st, h.dtype, self.flash)
            if kw.get("cache_position") is not None:
                kw["cache_position"] = torch.arange(W, device=st.gather.device)
            return kw
        if pos is not None and self.renumber:
            kw["position_ids"] = pos - st.total[:, None]
            if rope is not None:
                kw["position_embeddings"] = self._rope(h, kw["position_ids"])
        kv = st.length + self.run.decoded
        kw["attention_mask"] = _decode_mask(mask, st, kv, h.dtype, self.flash)
        if kw.get("cache_position") is not None:
            kw["cache_position"] = kw["cache_position"] - (st.length - W)
        return kw


# ---------------------------------------------------------------- helpers

def runs(is_image: torch.Tensor) -> list[range]:
    """The runs of True in a `[L]` row: one range per image (adapters' image positions)."""
    out = []
    for p in is_image.nonzero()[:, 0].tolist():
        if out and out[-1].stop == p:
            out[-1] = range(out[-1].start, p + 1)
        else:
            out.append(range(p, p + 1))
    return out


def _cache(kw):
    """The KV cache among a call's arguments: `past_key_value` (transformers 4.37),
    `past_key_values` (4.57) or `cache` (5.x); None without one."""
    return next((kw[k] for k in ("past_key_value", "past_key_values", "cache")
                 if kw.get(k) is not None), None)


def cache_length(kw) -> int:
    """Layer 0's KV length (0: no cache, or an empty one: a prefill)."""
    cache = _cache(kw)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length(0))
    return cache[0][0].shape[-2] if len(cache) else 0  # legacy tuples


def _whole_table(forward):
    def rope(self, x, seq_len=None):
        return forward(x, seq_len=max(seq_len or 0, self.max_seq_len_cached))
    return rope


def _qk(layer, h, kw, rows=None, keys=True):
    """The layer's post-RoPE queries at `rows` (`[B]` sequence indices, one per sample) `[B, H,
    d]` (None without rows) and its keys `[B, H, L, d]` (repeated to H heads; None if not
    `keys`), as its attention computes them."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    B, L, _ = x.shape
    d = attn.head_dim
    k = attn.k_proj(x).view(B, L, -1, d).transpose(1, 2) if keys else None
    q = None
    if rows is not None:
        xr = x.gather(1, rows[:, None, None].expand(-1, 1, x.shape[2]))
        q = attn.q_proj(xr).view(B, 1, -1, d).transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if kw.get("position_embeddings") is not None:    # transformers >= 4.48
        cos, sin = (t.expand(B, -1, -1) for t in kw["position_embeddings"])
        if k is not None:
            k = rope(k, k, cos, sin)[0]
        if q is not None:
            at = rows[:, None, None].expand(-1, 1, cos.shape[-1])
            q = rope(q, q, cos.gather(1, at), sin.gather(1, at))[0]
    else:                                            # 4.37: each attention's own table
        pos = kw["position_ids"].expand(B, -1)
        cos, sin = attn.rotary_emb(x, seq_len=int(pos.max()) + 1)
        if k is not None:
            k = rope(k, k, cos, sin, pos)[0]
        if q is not None:
            q = rope(q, q, cos, sin, pos.gather(1, rows[:, None]))[0]
    if k is not None:
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)   # as repeat_kv
    return (None if q is None else q[:, :, 0]), k


def _queries(layer, h, kw):
    """The layer's post-RoPE queries of every row `[B, H, L, d]`, as its attention computes them."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    B, L, _ = x.shape
    q = attn.q_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if kw.get("position_embeddings") is not None:    # transformers >= 4.48
        cos, sin = (t.expand(B, -1, -1) for t in kw["position_embeddings"])
        return rope(q, q, cos, sin)[0]
    pos = kw["position_ids"].expand(B, -1)           # 4.37: each attention's own table
    cos, sin = attn.rotary_emb(x, seq_len=int(pos.max()) + 1)
    return rope(q, q, cos, sin, pos)[0]


def _cached_keys(layer, kw, i, length):
    """Layer i's keys of this prefill from the KV cache (`[B, H, L, d]`, repeated to H heads):
    4.37's `key_cache[i]`, 4.57 / 5.x's `layers[i].keys`."""
    cache = _cache(kw)
    keys = cache.layers[i].keys if hasattr(cache, "layers") else cache.key_cache[i]
    if keys.shape[-2] != length:
        raise RuntimeError(f"in-LLM pruning: layer {i}'s KV cache holds {keys.shape[-2]} keys, "
                           f"expected this prefill's {length}")
    return keys.repeat_interleave(layer.self_attn.num_key_value_groups, dim=1)


def _inverse(st: _Stage | None, B: int, L: int, device) -> torch.Tensor:
    """`[B, L]`: where each source (original position; SparseVLM: merged tokens L + v too, L
    then counts them) sits in the current sequence."""
    if st is None:
        return torch.arange(L, device=device)[None].expand(B, L)
    inv = torch.zeros(B, L, dtype=torch.long, device=device)
    idx = torch.arange(st.gather.shape[1], device=device).expand_as(st.gather)
    return inv.scatter(1, st.src, idx.masked_fill(st.filler, 0))


def _blocked(mask):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _prefill_mask(mask, st: _Stage, dtype, flat=False):
    """The kept rows and columns of the prefill's mask: 4-D (additive or boolean), or 2-D
    padding masks (`flat`: FlashAttention-2); fillers are attended by nobody."""
    B, W = st.gather.shape
    fill = st.filler.any()
    if flat or (mask is not None and mask.dim() == 2):
        if mask is None and not fill:
            return None
        mask = st.gather.new_ones(B, st.length) if mask is None else mask
        return mask.gather(1, st.gather).masked_fill(st.filler, 0)
    if mask is None:
        if not fill:
            return None
        mask = torch.full((W, W), torch.finfo(dtype).min, dtype=dtype).triu(1)
        mask = mask.to(st.gather.device)[None, None].expand(B, 1, W, W).clone()
    else:
        g = st.gather[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
        mask = mask.gather(2, g)
        mask = mask.gather(3, st.gather[:, None, None, :].expand(-1, mask.shape[1], W, -1))
        if st.virtual:   # merged tokens share their proxy's row and column: causal in new order
            later = torch.ones(W, W, dtype=torch.bool, device=mask.device).triu(1)
            mask = mask.masked_fill(later, _blocked(mask))
    if fill:
        eye = torch.eye(W, dtype=torch.bool, device=mask.device)
        mask = mask.masked_fill(st.filler[:, None, None, :], _blocked(mask))
        mask = mask.masked_fill(st.filler[:, None, :, None] & eye, 0 if mask.dtype != torch.bool
                                else True)
    return mask


def _decode_mask(mask, st: _Stage, kv: int, dtype, flat=False):
    """A decoding step's mask over this layer's cache (its kept prefill tokens, then the new)."""
    B, W = st.gather.shape
    fill = st.filler.any()
    new = torch.arange(st.length, kv, device=st.gather.device)[None].expand(B, -1)
    cols = torch.cat([st.gather, new], 1)
    cf = torch.cat([st.filler, torch.zeros_like(new, dtype=torch.bool)], 1)
    if flat or (mask is not None and mask.dim() == 2):
        if mask is None and not fill:
            return None
        mask = cols.new_ones(B, kv) if mask is None else mask
        return mask.gather(1, cols).masked_fill(cf, 0)
    if mask is None:
        if not fill:
            return None
        mask = torch.zeros(B, 1, 1, cols.shape[1], dtype=dtype, device=cols.device)
    else:
        if mask.shape[-1] != kv:
            raise RuntimeError(f"in-LLM pruning expected a {kv}-column attention mask in "
                               f"decoding, got {mask.shape[-1]}")
        mask = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    if fill:
        mask = mask.masked_fill(cf[:, None, None, :], _blocked(mask))
    return mask
