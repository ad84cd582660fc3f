"""[CLS] attention of LLaVA's select layer, recomputed by a hook from that layer's own q/k.

The vision tower keeps its normal (fast) attention path: no `output_attentions=True`. The hook
sees the attention module's input, projects the CLS query and all keys with the module's own
`q_proj`/`k_proj`, and keeps the softmax row of the CLS query, averaged over heads, patches only.
"""
from __future__ import annotations

import torch


def select_layer_index(select_layer: int, num_layers: int) -> int:
    """Index into `encoder.layers` of the block whose output is `hidden_states[select_layer]`."""
    idx = num_layers + select_layer if select_layer < 0 else select_layer - 1
    if select_layer == 0 or select_layer < -num_layers or idx >= num_layers:
        raise ValueError(f"mm_vision_select_layer={select_layer} does not name a transformer block "
                         f"of this {num_layers}-layer vision tower; [CLS] attention needs one")
    return idx


def attention_module(tower) -> torch.nn.Module:
    """The attention module of the CLIP block LLaVA takes its features from."""
    clip = getattr(tower, "vision_tower", None)
    layers = getattr(getattr(getattr(clip, "vision_model", None), "encoder", None), "layers", None)
    if layers is None:
        raise ValueError("the vision tower is not loaded or is not a CLIP vision model; "
                         "load the model with LLaVA's load_pretrained_model first")
    return layers[select_layer_index(tower.select_layer, len(layers))].self_attn


@torch.no_grad()
def cls_attention_row(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`[B, T, C]` input of a CLIP attention module -> `[B, T-1]` CLS row (float32, head mean)."""
    b, t, _ = hidden.shape
    heads = attn.num_heads
    head_dim = attn.head_dim
    scale = getattr(attn, "scale", head_dim ** -0.5)
    q = (attn.q_proj(hidden[:, :1]).float() * scale).view(b, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).float().view(b, t, heads, head_dim).transpose(1, 2)
    row = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # [B, H, 1, T]
    return row.mean(dim=1)[:, 0, 1:]


class ClsAttentionHook:
    """A forward hook on one attention module; records rows only between `start` and `stop`."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.rows: list[torch.Tensor] = []
        self.active = False
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if self.active:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.rows.append(cls_attention_row(module, hidden))

    def start(self) -> None:
        self.rows, self.active = [], True

    def stop(self) -> torch.Tensor | None:
        """Rows recorded since `start`, concatenated in call order (`[B, N]`), or None."""
        self.active = False
        rows, self.rows = self.rows, []
        return torch.cat(rows) if rows else None

    def remove(self) -> None:
        self.active = False
        self.handle.remove()
