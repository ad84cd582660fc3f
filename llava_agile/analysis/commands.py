"""The work behind `analyze`, `calibrate` and `visualize` (the CLI parses, these run)."""
from __future__ import annotations

import json
from pathlib import Path

RECORDS, META = "records.jsonl", "meta.json"


def _model_id(model_path: str) -> str:
    p = Path(model_path)
    return str(p.resolve()) if p.is_dir() else str(model_path)


def _load(model_path, model_base, loaded):
    from .measure import load_model

    return loaded if loaded is not None else load_model(model_path, model_base)


def _progress(items, desc):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image", dynamic_ncols=True)


# ---------------------------------------------------------------- analyze

def _check_meta(out: Path, meta: dict, overwrite: bool) -> None:
    path = out / META
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"{out} holds an analysis with other settings ({', '.join(diff)}); "
                             f"use another --out, or --overwrite to start again")
    if overwrite:
        (out / RECORDS).unlink(missing_ok=True)
    path.write_text(json.dumps(meta, indent=1))


def analyze(model_path: str, items: list[dict], configs, out: str | Path, plots: bool = False,
            model_base: str | None = None, overwrite: bool = False, question: str | None = None,
            max_new_tokens: int = 16, loaded=None, title: str | None = None) -> dict:
    """Measure every item under every config; append one JSON line per image to
    `out/records.jsonl` (images already there are skipped: resumable); write the summaries
    (and the plots). Returns {"records": [...], "paths": {...}, "computed": n}."""
    from ..eval.answers import read_jsonl, repair_jsonl
    from .measure import Measurer, measure_image
    from .summary import table1, write_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model_path": _model_id(model_path), "model_base": model_base,
            "configs": [c.to_dict() for c in configs], "question": question}
    _check_meta(out, meta, overwrite)
    rpath = out / RECORDS
    repair_jsonl(rpath)
    done = {r["image"] for r in read_jsonl(rpath, missing_ok=True)}
    pending = [it for it in items if it["image"] not in done]
    if pending:
        tokenizer, model, processor = _load(model_path, model_base, loaded)
        measurer = Measurer(model, processor, tokenizer)
        with open(rpath, "a", encoding="utf-8") as f:
            for it in _progress(pending, "analyze"):
                rec = measure_image(measurer, it, configs, question, max_new_tokens)
                f.write(json.dumps(rec) + "\n")
                f.flush()
    wanted = {it["image"] for it in items}
    records = [r for r in read_jsonl(rpath) if r["image"] in wanted]
    paths = write_summary(records, out, title or f"Analysis of {Path(str(model_path)).name}")
    if plots:
        from .plots import retained_bars, scatter

        paths["scatter"] = scatter(records, out / "erank_vs_entropy.png")
        if any(r["runs"] for r in records):
            paths["bars"] = retained_bars(table1(records), out / "retained_erank.png")
    paths["records"] = rpath
    return {"records": records, "paths": paths, "computed": len(pending)}


# ---------------------------------------------------------------- calibrate

def calibrate(model_path: str, items: list[dict], out_file: str | Path,
              feature_space: str = "projected", model_base: str | None = None,
              loaded=None) -> dict:
    """Mean (and spread) of the full-image erank and [CLS]-attention entropy over `items`,
    written as JSON with `erank_avg` / `entropy_avg` (read by `--erank-avg-file`)."""
    from ..config import PruneConfig
    from .measure import Measurer, measure_image
    from .summary import spread

    tokenizer, model, processor = _load(model_path, model_base, loaded)
    measurer = Measurer(model, processor, tokenizer)
    probe = [PruneConfig("none", 1, feature_space=feature_space)]
    per_image = []
    for it in _progress(items, "calibrate"):
        rec = measure_image(measurer, it, probe)
        per_image.append({"image": it["image"], "category": it["category"],
                          "erank": rec["erank"], "entropy": rec["entropy"]})
    er, en = spread(r["erank"] for r in per_image), spread(r["entropy"] for r in per_image)
    result = {"model_path": _model_id(model_path), "feature_space": feature_space,
              "n_images": len(per_image), "erank_avg": er["mean"], "entropy_avg": en["mean"],
              "erank": er, "entropy": en, "images": per_image}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------- visualize

def visualize(image_path: str | Path, model_path: str, configs, out_png: str | Path,
              model_base: str | None = None, loaded=None, question: str | None = None) -> Path:
    """One PNG: the image as the model sees it and, per config, the kept patches."""
    from .inputs import open_image
    from .measure import Measurer, measure_image
    from .plots import overlay_figure

    image = open_image(image_path)
    tokenizer, model, processor = _load(model_path, model_base, loaded)
    measurer = Measurer(model, processor, tokenizer)
    item = {"image": Path(image_path).name, "path": str(image_path), "category": "default"}
    rec = measure_image(measurer, item, configs, question, image=image)
    view = measurer.input_view(measurer.pixels(image)[0])
    title = f"{Path(image_path).name}\n{Path(str(model_path)).name}, {rec['feature_space']} features"
    return overlay_figure(view, rec, out_png, title=title)
