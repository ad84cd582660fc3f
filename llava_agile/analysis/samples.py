"""The demo's images: real photos shipped inside installed packages (scikit-image's `data`
folder, matplotlib's sample data; read as files, the packages are not imported) and two text
images rendered with PIL. Groups: 'simple' and 'complex' scenes (chosen by content, before any
measurement) and 'text' (rendered, simple)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

# (package, file inside the package, group, name)
PHOTOS = (
    ("skimage", "data/rocket.jpg", "simple", "rocket"),
    ("skimage", "data/moon.png", "simple", "moon"),
    ("skimage", "data/camera.png", "simple", "camera"),
    ("skimage", "data/coins.png", "simple", "coins"),
    ("skimage", "data/astronaut.png", "complex", "astronaut"),
    ("skimage", "data/coffee.png", "complex", "coffee"),
    ("skimage", "data/chelsea.png", "complex", "chelsea"),
    ("skimage", "data/motorcycle_left.png", "complex", "motorcycle"),
    ("skimage", "data/hubble_deep_field.jpg", "complex", "hubble_deep_field"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "complex", "grace_hopper"),
)
TEXTS = (
    ("page", "The quick brown fox jumps\nover the lazy dog.\n\nVisual tokens: 576 -> 64.\n"
             "Simple images need fewer\ndistinct tokens than\ncluttered scenes."),
    ("sign", "STOP\nPRUNING\nHERE"),
)
INSTALL_HINT = "run `make setup` (requirements.txt pins scikit-image, which ships the photos)"


def package_file(package: str, relative: str) -> Path | None:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / relative
    return p if p.is_file() else None


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = package_file("matplotlib", f"mpl-data/fonts/ttf/{name}")
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()


def render_text(kind: str, text: str, size: tuple = (448, 448)):
    """A simple text image: black text on a white page, or white bold text on a red sign."""
    from PIL import Image, ImageDraw

    if kind == "sign":
        img = Image.new("RGB", size, (200, 30, 30))
        draw = ImageDraw.Draw(img)
        font = _font(72, bold=True)
        draw.multiline_text((size[0] // 2, size[1] // 2), text, fill="white", font=font,
                            anchor="mm", align="center", spacing=12)
    else:
        img = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(img)
        draw.multiline_text((24, 30), text, fill="black", font=_font(28), spacing=10)
    return img


def demo_images(dest: str | Path, limit: int | None = None) -> tuple[list[dict], list[str]]:
    """Write the demo images to `dest/<group>/<name>.png`; returns (analysis items with the
    source of each, the photos not found). A photo whose package is missing is skipped; no
    photo at all is an error."""
    from PIL import Image

    dest = Path(dest)
    items, missing = [], []
    for package, rel, group, name in PHOTOS:
        src = package_file(package, rel)
        if src is None:
            missing.append(f"{package}:{rel}")
            continue
        with Image.open(src) as im:
            img = im.convert("RGB")
        items.append((group, name, img, f"{package} ({rel})"))
    if not items:
        raise ValueError(f"no sample photos found ({', '.join(missing[:3])} ...); {INSTALL_HINT}")
    for kind, text in TEXTS:
        items.append(("text", f"text_{kind}", render_text(kind, text), "rendered with PIL"))
    if limit is not None:
        # keep the groups mixed when reduced: take round-robin over groups
        groups = list(dict.fromkeys(g for g, *_ in items))
        by = {g: [it for it in items if it[0] == g] for g in groups}
        mixed = [it for i in range(len(items)) for g in groups if i < len(by[g])
                 for it in [by[g][i]]]
        items = mixed[:limit]
    out = []
    for group, name, img, source in items:
        rel = f"{group}/{name}.png"
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        out.append({"image": rel, "path": str(path), "category": group, "categories": [group],
                    "source": source})
    return out, missing
