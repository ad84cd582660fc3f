"""Which images to measure: a LLaVA question file + image folder, or a folder of images.

An item is `{"image": relative path, "path": absolute path, "category": str, "categories": [..]}`;
an image asked about several times (several questions, or POPE's three categories) is one item,
with the category of its first question.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_CATEGORY = "default"


def from_question_file(question_file: str | Path, image_folder: str | Path) -> list[dict]:
    """Unique images of a LLaVA question file (JSONL, or SQA's JSON list), in first-seen order."""
    from ..eval.answers import load_questions

    qpath, folder = Path(question_file), Path(image_folder)
    if qpath.suffix == ".tsv":
        raise ValueError(f"{qpath}: MMBench TSV files carry their images inline; "
                         f"analyze needs a JSONL/JSON question file and an image folder")
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    questions = load_questions(qpath)
    items: dict[str, dict] = {}
    for q in questions:
        if not isinstance(q, dict):
            raise ValueError(f"{qpath}: every question must be a JSON object, got {str(q)[:80]}")
        image = q.get("image")
        if not image:      # ScienceQA: text-only questions have no image
            continue
        if not isinstance(image, str):
            raise ValueError(f"{qpath}: `image` must be a file name, got {image!r}")
        cat = str(q.get("category") or DEFAULT_CATEGORY)
        item = items.setdefault(image, {"image": image, "path": str(folder / image),
                                        "category": cat, "categories": []})
        if cat not in item["categories"]:
            item["categories"].append(cat)
    if not items:
        raise ValueError(f"{qpath}: no question names an image")
    missing = [it["image"] for it in items.values() if not Path(it["path"]).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {qpath} are not in {folder}, e.g. "
                         f"{missing[0]!r}")
    return list(items.values())


def from_folder(folder: str | Path) -> list[dict]:
    """Every image file under `folder` (sorted); the category is its sub-folder ('default' at
    the top level)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    items = []
    for p in files:
        rel = p.relative_to(root)
        cat = rel.parts[0] if len(rel.parts) > 1 else DEFAULT_CATEGORY
        items.append({"image": rel.as_posix(), "path": str(p), "category": cat,
                      "categories": [cat]})
    return items


def select(question_file=None, image_folder=None, images=None, limit=None) -> list[dict]:
    """Items from exactly one source: (question_file + image_folder) or images; first `limit`."""
    if images is not None and (question_file or image_folder):
        raise ValueError("give either --images DIR or --question-file with --image-folder, not both")
    if images is not None:
        items = from_folder(images)
    elif question_file and image_folder:
        items = from_question_file(question_file, image_folder)
    else:
        raise ValueError("give --question-file Q and --image-folder I (LLaVA's layout), "
                         "or --images DIR")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        items = items[:limit]
    return items


def open_image(path: str | Path):
    """RGB PIL image; a clear ValueError for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
