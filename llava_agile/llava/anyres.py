"""LLaVA-NeXT (anyres) layout with a keep-mask: the same view/permute/unpad/newline steps as
LLaVA's `prepare_inputs_labels_for_multimodal`, applied to positions instead of features.

A crop's token p sits at grid row `(crop // npw) * h + p // w`, column `(crop % npw) * w + p % w`
of the high-res grid (LLaVA's `view(nph, npw, h, w, D)` then `permute(.., 0, 2, 1, 3)`); unpadding
crops that grid with LLaVA's own `unpad_image`, and an `image_newline` ends every surviving row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """Where each high-res grid cell comes from: `crop[r, c]` (0-based among the high-res
    crops) and `patch[r, c]`, for the cells that survive unpadding; `newline`: add one per row."""
    crop: torch.Tensor
    patch: torch.Tensor
    newline: bool

    def candidates(self, base: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop, patch) in the LLM's order over the `[1 + crops, base]` features: the base
        crop's `base` patches (crop 0), then every surviving cell (crop 1 + its high-res crop)
        in raster order. The `global` anyres mode selects among these."""
        dev = self.crop.device
        return (torch.cat([torch.zeros(base, dtype=torch.long, device=dev),
                           self.crop.reshape(-1) + 1]),
                torch.cat([torch.arange(base, device=dev), self.patch.reshape(-1)]))


def grid_layout(model, image_size, n_crops: int, side: int, device=None) -> Layout:
    """The layout of one image's `n_crops` high-res crops (the base crop excluded)."""
    from llava.model import llava_arch

    cfg = model.config
    merge = getattr(cfg, "mm_patch_merge_type", "flat")
    if getattr(cfg, "image_aspect_ratio", "square") != "anyres":
        raise ValueError("LLaVA handles several crops per image only with image_aspect_ratio "
                         "'anyres'; this model's config says "
                         f"{getattr(cfg, 'image_aspect_ratio', None)!r}")
    npw, nph = llava_arch.get_anyres_image_grid_shape(
        image_size, cfg.image_grid_pinpoints, model.get_vision_tower().config.image_size)
    if npw * nph != n_crops:
        raise ValueError(f"the anyres grid for image size {tuple(image_size)} has {npw}x{nph} "
                         f"crops, but {n_crops} high-res crops were given")
    rows = torch.arange(nph * side)[:, None]
    cols = torch.arange(npw * side)[None, :]
    flat = (rows * (npw * side) + cols)[None]                    # [1, H, W] cell ids
    if "unpad" in merge:
        flat = llava_arch.unpad_image(flat, image_size)
    flat = flat[0]
    r, c = flat // (npw * side), flat % (npw * side)
    crop = (r // side) * npw + c // side
    patch = (r % side) * side + c % side
    return Layout(crop=crop.to(device), patch=patch.to(device), newline="unpad" in merge)


def assemble(base: torch.Tensor, base_keep: torch.Tensor, crops: torch.Tensor,
             crops_keep: torch.Tensor, layout: Layout, newline: torch.Tensor | None):
    """Merged sequence of one image: kept base tokens, then the kept high-res cells row by row,
    each row closed by `newline` (never dropped). Returns (tokens `[L, D]`, fed mask `[1+n, N]`)."""
    d = base.shape[-1]
    cells = crops[layout.crop, layout.patch]                    # [H', W', D]
    keep = crops_keep[layout.crop, layout.patch]                # [H', W']
    if layout.newline:
        rows = cells.shape[0]
        cells = torch.cat([cells, newline.to(cells)[None, None].expand(rows, 1, d)], dim=1)
        keep = torch.cat([keep, torch.ones(rows, 1, dtype=torch.bool, device=keep.device)], dim=1)
    tokens = torch.cat([base[base_keep], cells.reshape(-1, d)[keep.reshape(-1)]])
    fed = torch.zeros(1 + crops.shape[0], base.shape[0], dtype=torch.bool, device=base_keep.device)
    fed[0] = base_keep
    sel = crops_keep[layout.crop, layout.patch]
    fed[1 + layout.crop[sel], layout.patch[sel]] = True
    return tokens, fed
