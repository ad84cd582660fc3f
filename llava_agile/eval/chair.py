"""CHAIR (Rohrbach et al., 2018) object hallucination on COCO val2014 captions.

CHAIR_S: % of captions mentioning at least one object absent from the image; CHAIR_I: % of
object mentions that are absent; recall: % of the images' ground-truth objects mentioned;
length: mean words per caption. Ground-truth objects come from `instances_val2014.json` (and
also from the human captions in `captions_val2014.json` when it sits beside it, as in the
original metric). Words map to the 80 COCO categories through `data/coco_synonyms.txt`.
The evaluated images are a deterministic sample (`sample_image_ids`, seed 0 by default).
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from .answers import question_id
from .benchmarks import require
from .common import check_answers, load_json, pct

SYNONYMS = Path(__file__).with_name("data") / "coco_synonyms.txt"
PROMPT = "Please describe this image in detail."
ANIMALS = {"bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"}
VEHICLES = {"train", "airplane", "bus", "boat", "car"}
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "mice": "mouse", "geese": "goose",
              "oxen": "ox", "knives": "knife", "teeth": "tooth", "feet": "foot", "calves": "calf",
              "policemen": "policeman", "policewomen": "policewoman", "fishermen": "fisherman",
              "businessmen": "businessman", "businesswomen": "businesswoman", "wolves": "wolf",
              "people": "people", "cattle": "cattle", "sheep": "sheep", "skis": "skis",
              "scissors": "scissors", "buses": "bus", "ponies": "pony", "puppies": "puppy"}


class Vocabulary:
    """Phrase -> COCO category, with plural reduction and the usual CHAIR special cases."""

    def __init__(self, path: str | Path = SYNONYMS):
        self.phrases: dict[tuple[str, ...], str] = {}
        self.categories: list[str] = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            names = [n.strip() for n in line.split(",") if n.strip()]
            self.categories.append(names[0])
            for n in names:
                self.phrases.setdefault(tuple(n.split()), names[0])
        self.known = {t for p in self.phrases for t in p} | {"animal", "cub"}
        self.longest = max(len(p) for p in self.phrases)

    def singular(self, w: str) -> str:
        if w in self.known:
            return w
        cands = [_IRREGULAR.get(w, "")]
        if w.endswith("ies"):
            cands.append(w[:-3] + "y")
        if w.endswith("ves"):
            cands += [w[:-3] + "f", w[:-3] + "fe"]
        if w.endswith("es"):
            cands.append(w[:-2])
        if w.endswith("s") and not w.endswith("ss"):
            cands.append(w[:-1])
        return next((c for c in cands if c in self.known), w)

    def mentions(self, caption: str) -> list[str]:
        """The COCO categories mentioned, once per mention, in caption order."""
        toks = [self.singular(t) for t in re.findall(r"[a-z]+", caption.lower().replace("-", " "))]
        found, i = [], 0
        while i < len(toks):
            for n in range(min(self.longest, len(toks) - i), 0, -1):
                cat = self.phrases.get(tuple(toks[i:i + n]))
                if cat is not None:
                    found.append((i, n, cat))
                    i += n
                    break
            else:
                i += 1
        starts = {s: c for s, _, c in found}
        out = []
        for s, n, cat in found:
            nxt = starts.get(s + n, toks[s + n] if s + n < len(toks) else None)
            if cat == "person" and (nxt in ANIMALS or nxt in ("animal", "cub")
                                    or (toks[s] == "passenger" and nxt in VEHICLES)):
                continue  # 'baby elephant', 'adult bird', 'passenger train' are no people
            out.append(cat)
        return out


@lru_cache(maxsize=2)
def vocabulary(path: str = str(SYNONYMS)) -> Vocabulary:
    return Vocabulary(path)


def _instances_path(annotations: str | Path) -> tuple[Path, Path | None]:
    ann = require(annotations, "chair", "COCO annotations (instances_val2014.json or its folder)")
    if ann.is_dir():
        inst = require(ann / "instances_val2014.json", "chair", "COCO instances_val2014.json")
        caps = ann / "captions_val2014.json"
        return inst, caps if caps.exists() else None
    return ann, None


def image_id(qid) -> int:
    if isinstance(qid, int):
        return qid
    digits = re.findall(r"\d+", str(qid))
    if not digits:
        raise ValueError(f"chair: cannot read a COCO image id from question id {qid!r}")
    return int(digits[-1])


def sample_image_ids(all_ids, n: int = 500, seed: int = 0) -> list[int]:
    """`n` image ids drawn with `random.Random(seed)` from the sorted ids, returned sorted."""
    ids = sorted(set(int(i) for i in all_ids))
    if not 0 < n <= len(ids):
        raise ValueError(f"chair: cannot sample {n} of {len(ids)} images")
    return sorted(random.Random(seed).sample(ids, n))


def questions(annotations: str | Path, n: int = 500, seed: int = 0, prompt: str = PROMPT) -> list[dict]:
    """LLaVA question records for the CHAIR sample (model_vqa_loader format)."""
    inst, _ = _instances_path(annotations)
    images = {im["id"]: im["file_name"] for im in load_json(inst, "chair")["images"]}
    return [{"question_id": i, "image": images[i], "text": prompt, "category": "default"}
            for i in sample_image_ids(images, n, seed)]


def ground_truth(annotations: str | Path, voc: Vocabulary) -> tuple[dict[int, set], list[str]]:
    inst, caps = _instances_path(annotations)
    data = load_json(inst, "chair")
    names = {c["id"]: c["name"] for c in data["categories"]}
    bad = sorted(set(names.values()) - set(voc.categories))
    if bad:
        raise ValueError(f"chair: categories {bad} of {inst} are not in {SYNONYMS.name}")
    objs = {im["id"]: set() for im in data["images"]}
    for a in data["annotations"]:
        objs.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    sources = ["instances"]
    if caps is not None:
        for a in load_json(caps, "chair")["annotations"]:
            objs.setdefault(a["image_id"], set()).update(voc.mentions(a["caption"]))
        sources.append("captions")
    return objs, sources


def score(answers: list[dict], annotations: str) -> dict:
    check_answers(answers, "chair")
    voc = vocabulary()
    gt, sources = ground_truth(annotations, voc)
    n_hal_caps = mentions = hallucinated = covered = total_gt = words = 0
    for rec in answers:
        img = image_id(question_id(rec))
        if img not in gt:
            raise ValueError(f"chair: image {img} is not in the COCO annotations")
        said = voc.mentions(rec["text"])
        wrong = [c for c in said if c not in gt[img]]
        mentions += len(said)
        hallucinated += len(wrong)
        n_hal_caps += bool(wrong)
        covered += len(set(said) & gt[img])
        total_gt += len(gt[img])
        words += len(rec["text"].split())
    n = len(answers)
    return {"benchmark": "chair", "chair_s": pct(n_hal_caps, n), "chair_i": pct(hallucinated, mentions),
            "recall": pct(covered, total_gt), "length": round(words / n, 6), "n": n,
            "mentions": mentions, "hallucinated": hallucinated, "gt_sources": sources}
