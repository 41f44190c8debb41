#!/usr/bin/env python3
"""Generate the fonts36 domain-shift benchmark.

Source domain: printed font families. Target domain: handwriting-style font
families, split by family into an adaptation set and a test set.

Output layout (ImageFolder):
    OUT/fonts36/source/train/<class>/<n>.png
    OUT/fonts36/source/test/<class>/<n>.png
    OUT/fonts36/target/adapt/<class>/<n>.png
    OUT/fonts36/target/test/<class>/<n>.png
    OUT/fonts36/DATASET.json

Every image is an 8-bit grayscale PNG, dark glyph on a white background.
Each image is drawn from its own random stream derived from
(seed, split, class, index), so output is byte-identical for a given seed
and pinned library versions (see requirements.txt).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

GENERATOR_VERSION = "1.0.0"
CLASSES = list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
FONT_ROOT = "/usr/share/fonts"

# (package, family, [files relative to FONT_ROOT])
URW = "opentype/urw-base35/"
DJV = "truetype/dejavu/"
LIB = "truetype/liberation2/"
FRE = "truetype/freefont/"

SOURCE_FAMILIES = [
    ("fonts-urw-base35", "Nimbus Sans", [URW + f for f in (
        "NimbusSans-Regular.otf", "NimbusSans-Bold.otf",
        "NimbusSans-Italic.otf", "NimbusSans-BoldItalic.otf")]),
    ("fonts-urw-base35", "Nimbus Sans Narrow", [URW + f for f in (
        "NimbusSansNarrow-Regular.otf", "NimbusSansNarrow-Bold.otf",
        "NimbusSansNarrow-Oblique.otf", "NimbusSansNarrow-BoldOblique.otf")]),
    ("fonts-urw-base35", "Nimbus Roman", [URW + f for f in (
        "NimbusRoman-Regular.otf", "NimbusRoman-Bold.otf",
        "NimbusRoman-Italic.otf", "NimbusRoman-BoldItalic.otf")]),
    ("fonts-urw-base35", "Nimbus Mono PS", [URW + f for f in (
        "NimbusMonoPS-Regular.otf", "NimbusMonoPS-Bold.otf",
        "NimbusMonoPS-Italic.otf", "NimbusMonoPS-BoldItalic.otf")]),
    ("fonts-urw-base35", "C059", [URW + f for f in (
        "C059-Roman.otf", "C059-Bold.otf", "C059-Italic.otf", "C059-BdIta.otf")]),
    ("fonts-urw-base35", "P052", [URW + f for f in (
        "P052-Roman.otf", "P052-Bold.otf", "P052-Italic.otf", "P052-BoldItalic.otf")]),
    ("fonts-urw-base35", "URW Bookman", [URW + f for f in (
        "URWBookman-Light.otf", "URWBookman-Demi.otf",
        "URWBookman-LightItalic.otf", "URWBookman-DemiItalic.otf")]),
    ("fonts-urw-base35", "URW Gothic", [URW + f for f in (
        "URWGothic-Book.otf", "URWGothic-Demi.otf",
        "URWGothic-BookOblique.otf", "URWGothic-DemiOblique.otf")]),
    ("fonts-dejavu-core", "DejaVu Sans", [DJV + f for f in (
        "DejaVuSans.ttf", "DejaVuSans-Bold.ttf")]),
    ("fonts-dejavu-core", "DejaVu Serif", [DJV + f for f in (
        "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")]),
    ("fonts-dejavu-core", "DejaVu Sans Mono", [DJV + f for f in (
        "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")]),
    ("fonts-liberation2", "Liberation Sans", [LIB + f for f in (
        "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf",
        "LiberationSans-Italic.ttf", "LiberationSans-BoldItalic.ttf")]),
    ("fonts-liberation2", "Liberation Serif", [LIB + f for f in (
        "LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf",
        "LiberationSerif-Italic.ttf", "LiberationSerif-BoldItalic.ttf")]),
    ("fonts-liberation2", "Liberation Mono", [LIB + f for f in (
        "LiberationMono-Regular.ttf", "LiberationMono-Bold.ttf",
        "LiberationMono-Italic.ttf", "LiberationMono-BoldItalic.ttf")]),
    ("fonts-freefont-ttf", "FreeSans", [FRE + f for f in (
        "FreeSans.ttf", "FreeSansBold.ttf", "FreeSansOblique.ttf",
        "FreeSansBoldOblique.ttf")]),
    ("fonts-freefont-ttf", "FreeSerif", [FRE + f for f in (
        "FreeSerif.ttf", "FreeSerifBold.ttf", "FreeSerifItalic.ttf",
        "FreeSerifBoldItalic.ttf")]),
    ("fonts-freefont-ttf", "FreeMono", [FRE + f for f in (
        "FreeMono.ttf", "FreeMonoBold.ttf", "FreeMonoOblique.ttf",
        "FreeMonoBoldOblique.ttf")]),
]

# Handwriting-style families. No family occurs in both target splits.
TARGET_ADAPT_FAMILIES = [
    # Only the bold styles: the regular and italic styles draw many strokes
    # as double lines that read as hollow outlines at 96 px.
    ("fonts-dkg-handwriting", "dkg handwriting", [
        "truetype/fifthhorseman/dkgBd.ttf", "truetype/fifthhorseman/dkgBI.ttf"]),
    ("fonts-sjfonts", "Steve Hand", ["truetype/sjfonts/SteveHand.ttf"]),
    ("fonts-comic-neue", "Comic Neue", [
        "opentype/comic-neue/ComicNeue-Regular.otf",
        "opentype/comic-neue/ComicNeue-Bold.otf",
        "opentype/comic-neue/ComicNeue-Italic.otf",
        "opentype/comic-neue/ComicNeue-BoldItalic.otf",
        "opentype/comic-neue/ComicNeue-Light.otf",
        "opentype/comic-neue/ComicNeue-LightItalic.otf"]),
    ("fonts-kristi", "Kristi", ["truetype/kristi/Kristi.ttf"]),
    ("fonts-bwht", "Because We Build", ["opentype/bwht/BecauseWeBuild-Regular.otf"]),
    ("fonts-bwht", "Because We Create", ["opentype/bwht/BecauseWeCreate-Regular.otf"]),
    ("fonts-bwht", "Because We Mentor", ["opentype/bwht/BecauseWeMentor-Regular.otf"]),
    ("fonts-rufscript", "Rufscript", ["truetype/rufscript/Rufscript010.ttf"]),
    ("fonts-tlwg-purisa-otf", "Purisa", [
        "opentype/tlwg/Purisa.otf", "opentype/tlwg/Purisa-Bold.otf",
        "opentype/tlwg/Purisa-Oblique.otf", "opentype/tlwg/Purisa-BoldOblique.otf"]),
]

TARGET_TEST_FAMILIES = [
    ("fonts-breip", "Breip", ["truetype/breip/breipfont.ttf"]),
    ("fonts-sjfonts", "Delphine", ["truetype/sjfonts/Delphine.ttf"]),
    ("fonts-dancingscript", "Dancing Script", [
        "opentype/dancingscript/DancingScript-Regular.otf",
        "opentype/dancingscript/DancingScript-Bold.otf"]),
    ("fonts-humor-sans", "Humor Sans", ["truetype/humor-sans/Humor-Sans.ttf"]),
    ("fonts-bwht", "Because We Connect", ["opentype/bwht/BecauseWeConnect-Regular.otf"]),
    ("fonts-bwht", "Because We Learn", ["opentype/bwht/BecauseWeLearn-Regular.otf"]),
    ("fonts-bwht", "Because We Organize", ["opentype/bwht/BecauseWeOrganize-Regular.otf"]),
    ("fonts-tomsontalks", "Tomson Talks", ["truetype/tomsontalks/TomsonTalks.ttf"]),
    ("fonts-kaushanscript", "Kaushan Script", [
        "opentype/kaushanscript/KaushanScript-Regular.otf"]),
]

# split name -> (directory, families, images per class)
SPLITS = [
    ("source/train", SOURCE_FAMILIES, 150),
    ("source/test", SOURCE_FAMILIES, 30),
    ("target/adapt", TARGET_ADAPT_FAMILIES, 60),
    ("target/test", TARGET_TEST_FAMILIES, 60),
]
SPLIT_IDS = {"source/train": 1, "source/test": 2, "target/adapt": 3, "target/test": 4}

RENDER_PX = 256          # font size used for the high-resolution render
MAX_ROT_DEG = 12.0
MAX_SHIFT_FRAC = 0.08
SCALE_RANGE = (0.70, 1.00)
BOX_FRAC = 0.875         # glyph box as a fraction of the image side
MARGIN_PX = 2            # ink (and blur) never touches the image border


class FontCache:
    def __init__(self):
        self._fonts = {}

    def get(self, rel):
        f = self._fonts.get(rel)
        if f is None:
            f = ImageFont.truetype(os.path.join(FONT_ROOT, rel), RENDER_PX)
            self._fonts[rel] = f
        return f


def ink_mask(font, ch):
    """High-resolution coverage mask (L, 255 = ink) cropped to the ink box."""
    pad = RENDER_PX
    canvas = Image.new("L", (RENDER_PX * 3, RENDER_PX * 3), 0)
    ImageDraw.Draw(canvas).text((pad, pad), ch, font=font, fill=255)
    box = canvas.getbbox()
    if box is None:
        raise ValueError("empty glyph")
    return canvas.crop(box)


def crop_ink(mask):
    box = mask.point(lambda v: 255 if v > 8 else 0).getbbox()
    return mask.crop(box) if box else mask


def morph(mask, radius_hi):
    """Dilate (radius > 0) or erode (radius < 0) a mask by |radius| pixels."""
    if radius_hi == 0:
        return mask
    size = 2 * abs(radius_hi) + 1
    if radius_hi > 0:
        big = Image.new("L", (mask.width + size * 2, mask.height + size * 2), 0)
        big.paste(mask, (size, size))
        return big.filter(ImageFilter.MaxFilter(size))
    return mask.filter(ImageFilter.MinFilter(size))


def quantize(img, levels):
    """Snap an L image to `levels` evenly spaced grey values (0 and 255 kept)."""
    if levels >= 256:
        return img
    step = 255.0 / (levels - 1)
    lut = [int(round(round(v / step) * step)) for v in range(256)]
    return img.point(lut)


def render(font, ch, rng, size, levels=256):
    """Render one sample; returns an L image (ink dark, background white)."""
    angle = float(rng.uniform(-MAX_ROT_DEG, MAX_ROT_DEG))
    scale = float(rng.uniform(*SCALE_RANGE))
    shift = rng.uniform(-MAX_SHIFT_FRAC, MAX_SHIFT_FRAC, size=2) * size
    # stroke jitter in output pixels: 0 none, +0.5/+1 thicker, -0.5 thinner
    stroke_out = float(rng.choice([0.0, 0.0, 0.5, 1.0, -0.5]))
    blur = float(rng.choice([0.0, 0.0, 0.0, 0.4, 0.6]))

    base = ink_mask(font, ch)
    box = BOX_FRAC * size * scale
    # factor from high-res pixels to output pixels, from the unrotated glyph
    factor = box / max(base.width, base.height)
    radius_hi = int(round(stroke_out / factor))
    m = base
    if radius_hi != 0:
        cand = crop_ink(morph(base, radius_hi))
        # skip erosion when it would remove much of a thin glyph
        if radius_hi > 0 or np.asarray(cand).sum() > 0.6 * np.asarray(base).sum():
            m = cand
    m = m.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=0)
    m = crop_ink(m)
    factor = box / max(m.width, m.height)
    w = max(1, int(round(m.width * factor)))
    h = max(1, int(round(m.height * factor)))
    m = m.resize((w, h), resample=Image.LANCZOS, reducing_gap=3.0)

    x = (size - w) / 2.0 + shift[0]
    y = (size - h) / 2.0 + shift[1]
    x = int(round(min(max(x, MARGIN_PX), size - MARGIN_PX - w)))
    y = int(round(min(max(y, MARGIN_PX), size - MARGIN_PX - h)))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(m, (x, y))
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return quantize(Image.eval(canvas, lambda v: 255 - v), levels)


def sample_rng(seed, split, cls_idx, n):
    return np.random.default_rng([seed, SPLIT_IDS[split], cls_idx, n])


def pick_font(families, n):
    """Round-robin over families, then over the styles of that family."""
    fam = families[n % len(families)]
    files = fam[2]
    return fam, files[(n // len(families)) % len(files)]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def package_version(pkg, _cache={}):
    """Installed Debian package version, or None when dpkg is unavailable."""
    if pkg not in _cache:
        try:
            out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg],
                                 capture_output=True, text=True, check=True)
            _cache[pkg] = out.stdout.strip() or None
        except (OSError, subprocess.CalledProcessError):
            _cache[pkg] = None
    return _cache[pkg]


def augmentation_meta():
    """DATASET.json description of the glyph jitter applied by render()."""
    return {
        "rotation_deg": [-MAX_ROT_DEG, MAX_ROT_DEG],
        "shift_fraction": [-MAX_SHIFT_FRAC, MAX_SHIFT_FRAC],
        "scale_of_box": list(SCALE_RANGE),
        "box_fraction": BOX_FRAC,
        "stroke_px": [-0.5, 0.0, 0.5, 1.0],
        "gaussian_blur_radius": [0.0, 0.4, 0.6],
    }


def families_meta(families, usage):
    """DATASET.json entries for `families`; `usage` maps font file -> images."""
    return [
        {
            "package": pkg,
            "package_version": package_version(pkg),
            "family": fam,
            "files": [
                {"file": os.path.join(FONT_ROOT, rel),
                 "sha256": sha256(os.path.join(FONT_ROOT, rel)),
                 "images": usage.get(rel, 0)}
                for rel in files
            ],
        }
        for pkg, fam, files in families
    ]


def check_fonts(splits=SPLITS):
    """Problems with the fonts of `splits` ((dir, families, count) tuples)."""
    from fontTools.ttLib import TTFont  # only needed for the coverage check
    bad = []
    for _, families, _ in splits:
        for pkg, fam, files in families:
            for rel in files:
                path = os.path.join(FONT_ROOT, rel)
                if not os.path.exists(path):
                    bad.append(f"{rel}: missing (install {pkg})")
                    continue
                cmap = TTFont(path, lazy=True).getBestCmap()
                miss = [c for c in CLASSES if ord(c) not in cmap]
                if miss:
                    bad.append(f"{rel}: no glyph for {''.join(miss)}")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory; fonts36/ is created inside")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--levels", type=int, default=16,
                    help="number of grey levels kept (smaller PNGs); 256 = no quantisation")
    ap.add_argument("--scale-counts", type=float, default=1.0,
                    help="multiply per-class counts (for quick tests)")
    ap.add_argument("--skip-font-check", action="store_true")
    args = ap.parse_args()

    cache = FontCache()
    if not args.skip_font_check:
        bad = check_fonts()
        if bad:
            sys.exit("font check failed:\n  " + "\n  ".join(bad))

    root = os.path.join(args.out, "fonts36")
    meta = {
        "name": "fonts36",
        "generator": "tools/fonts36/generate.py",
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "image_size": [args.size, args.size],
        "channels": 1,
        "grey_levels": args.levels,
        "format": "PNG, 8-bit grayscale, dark glyph on white background",
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
        "classes": CLASSES,
        "augmentation": augmentation_meta(),
        "splits": {},
    }

    total = 0
    for split, families, per_class in SPLITS:
        count = max(1, int(round(per_class * args.scale_counts)))
        usage = {}
        for ci, ch in enumerate(CLASSES):
            d = os.path.join(root, split, ch)
            os.makedirs(d, exist_ok=True)
            for n in range(count):
                fam, rel = pick_font(families, n)
                img = render(cache.get(rel), ch, sample_rng(args.seed, split, ci, n),
                             args.size, args.levels)
                img.save(os.path.join(d, f"{n}.png"), optimize=True)
                usage[rel] = usage.get(rel, 0) + 1
                total += 1
        meta["splits"][split] = {
            "per_class_count": {c: count for c in CLASSES},
            "total": count * len(CLASSES),
            "families": families_meta(families, usage),
        }
        print(f"{split}: {count * len(CLASSES)} images", file=sys.stderr)

    meta["total_images"] = total
    with open(os.path.join(root, "DATASET.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
