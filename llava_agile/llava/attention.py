"""[CLS] attention of LLaVA's select layer, recomputed by a hook from that layer's own q/k.

The vision tower keeps its normal (fast) attention path: no `output_attentions=True`. The hook
sees the attention module's input, projects the CLS query and all keys with the module's own
`q_proj`/`k_proj`, and keeps the softmax row of the CLS query, averaged over heads, patches only.
PruMerge+ instead hooks the block after the select layer and keeps one full-width head's row and
its full keys (`single_head`).
With `keys=True` it also keeps that layer's patch keys (`k_proj` output averaged over heads:
VisionZip's similarity metric, as its patched `CLIPAttention.forward` returns it) and, from a
second hook on the block, the block's [CLS] output (the CLS row of `hidden_states[select_layer]`,
which VisionZip feeds as a dominant token).
"""
from __future__ import annotations

import torch

from ..metrics import compute_dtype


def select_layer_index(select_layer: int, num_layers: int) -> int:
    """Index into `encoder.layers` of the block whose output is `hidden_states[select_layer]`."""
    idx = num_layers + select_layer if select_layer < 0 else select_layer - 1
    if select_layer == 0 or select_layer < -num_layers or idx >= num_layers:
        raise ValueError(f"mm_vision_select_layer={select_layer} does not name a transformer block "
                         f"of this {num_layers}-layer vision tower; [CLS] attention needs one")
    return idx


def select_block(tower) -> torch.nn.Module:
    """The CLIP block LLaVA takes its features from (its output is `hidden_states[select_layer]`)."""
    clip = getattr(tower, "vision_tower", None)
    layers = getattr(getattr(getattr(clip, "vision_model", None), "encoder", None), "layers", None)
    if layers is None:
        raise ValueError("the vision tower is not loaded or is not a CLIP vision model; "
                         "load the model with LLaVA's load_pretrained_model first")
    return layers[select_layer_index(tower.select_layer, len(layers))]


def attention_module(tower) -> torch.nn.Module:
    """The attention module of the CLIP block LLaVA takes its features from."""
    return select_block(tower).self_attn


def next_attention_module(layers, select_index: int) -> torch.nn.Module:
    """The attention module of the block after the select one (PruMerge+ scores with it: its
    input is the select layer's output, normed)."""
    if select_index + 1 >= len(layers):
        raise ValueError("prumerge_plus scores with the vision block after the select layer, and "
                         "the select layer is the tower's last; use a model whose select layer "
                         "is not the last (LLaVA: -2)")
    return layers[select_index + 1].self_attn


@torch.no_grad()
def single_head_row(attn: torch.nn.Module, hidden: torch.Tensor):
    """PruMerge+'s [CLS] row: the module's q / k over the full width as one head (scale
    `1 / sqrt(width)`, the module's own scaling not applied), softmax over every key, [CLS]
    column dropped -> (`[B, T-1]`, the patch keys `[B, T-1, width]`)."""
    dtype = compute_dtype(hidden)
    q = attn.q_proj(hidden[:, :1]).to(dtype)
    k = attn.k_proj(hidden).to(dtype)
    row = torch.softmax(q @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)  # [B, 1, T]
    return row[:, 0, 1:], k[:, 1:]


@torch.no_grad()
def cls_attention_row(attn: torch.nn.Module, hidden: torch.Tensor, with_keys: bool = False):
    """`[B, T, C]` input of a CLIP attention module -> `[B, T-1]` CLS row (head mean); with
    `with_keys`, also the patch keys `[B, T-1, head_dim]` (head mean). Computed in float32, or
    float64 for a float64 tower (as the methods compute)."""
    b, t, _ = hidden.shape
    heads = attn.num_heads
    head_dim = attn.head_dim
    scale = getattr(attn, "scale", head_dim ** -0.5)
    dtype = compute_dtype(hidden)
    q = (attn.q_proj(hidden[:, :1]).to(dtype) * scale).view(b, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).to(dtype).view(b, t, heads, head_dim).transpose(1, 2)
    row = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, 1, T]
    if with_keys:
        return row.mean(dim=1)[:, 0, 1:], k.mean(dim=1)[:, 1:]
    return row.mean(dim=1)[:, 0, 1:]


class ClsAttentionHook:
    """A forward hook on one attention module; records rows only between `start` and `stop`
    (and, with `keys=True`, the patch keys, read with `stop_keys` after `stop`; with `block`, the
    module's CLIP block, that block's [CLS] output, read with `stop_cls`)."""

    def __init__(self, module: torch.nn.Module, keys: bool = False,
                 block: torch.nn.Module | None = None, single_head: bool = False):
        self.module = module
        self.single_head = single_head  # PruMerge+: one head over the full width, full keys
        self.rows: list[torch.Tensor] = []
        self.with_keys = keys
        self.keys: list[torch.Tensor] = []
        self.cls: list[torch.Tensor] = []
        self.active = False
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)
        self.block_handle = None if block is None else block.register_forward_hook(self._block)

    def _block(self, module, args, output):
        if self.active:
            self.cls.append((output[0] if isinstance(output, tuple) else output)[:, 0])

    def _hook(self, module, args, kwargs, output):
        if self.active:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if self.single_head:
                row, keys = single_head_row(module, hidden)
                self.keys.append(keys)
            elif self.with_keys:
                row, keys = cls_attention_row(module, hidden, with_keys=True)
                self.keys.append(keys)
            else:
                row = cls_attention_row(module, hidden)
            self.rows.append(row)

    def start(self) -> None:
        self.rows, self.keys, self.cls, self.active = [], [], [], True

    def stop(self) -> torch.Tensor | None:
        """Rows recorded since `start`, concatenated in call order (`[B, N]`), or None."""
        self.active = False
        rows, self.rows = self.rows, []
        return torch.cat(rows) if rows else None

    def stop_keys(self) -> torch.Tensor | None:
        """Keys recorded since `start` (`[B, N, head_dim]`, call order), or None; call after stop."""
        keys, self.keys = self.keys, []
        return torch.cat(keys) if keys else None

    def stop_cls(self) -> torch.Tensor | None:
        """The block's [CLS] outputs since `start` (`[B, C]`, call order), or None; after stop."""
        cls, self.cls = self.cls, []
        return torch.cat(cls) if cls else None

    def remove(self) -> None:
        self.active = False
        self.handle.remove()
        if self.block_handle is not None:
            self.block_handle.remove()


def hook_for(method: str, layers, select_index: int) -> ClsAttentionHook:
    """The [CLS]-attention hook `method` needs on a CLIP tower's blocks: PruMerge+'s on the block
    after the select one; VisionZip's with the select layer's keys and [CLS] output; else the
    select layer's head-mean row."""
    if method == "prumerge_plus":
        return ClsAttentionHook(next_attention_module(layers, select_index), single_head=True)
    block = layers[select_index]
    zip_ = method == "visionzip"
    return ClsAttentionHook(block.self_attn, keys=zip_, block=block if zip_ else None)
