#!/usr/bin/env python3
"""Generate fonts36-camera: printed glyphs as seen by a cheap camera in poor light.

Same 36 classes and printed font families as the fonts36 source domain; the
shift is in imaging only. Each image is a fonts36 source-style glyph put
through a seeded random combination of perspective skew, low contrast,
inverted polarity, an illumination gradient, defocus blur, sensor noise and
JPEG compression.

Output layout (ImageFolder):
    OUT/fonts36-camera/target/adapt/<class>/<n>.png
    OUT/fonts36-camera/target/test/<class>/<n>.png
    OUT/fonts36-camera/DATASET.json

target/adapt and target/test use disjoint halves of the fonts36 source
families. Output is byte-identical for a given seed and pinned library
versions (see requirements.txt).
"""

import argparse
import io
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as g  # noqa: E402  (glyph rendering and font lists)

GENERATOR_VERSION = "1.0.0"
NAME = "fonts36-camera"

# Families alternate between the splits in SOURCE_FAMILIES order, which keeps
# sans, serif and monospace families on both sides.
ADAPT_FAMILIES = g.SOURCE_FAMILIES[0::2]
TEST_FAMILIES = g.SOURCE_FAMILIES[1::2]

# split name -> (directory, families, images per class)
SPLITS = [
    ("target/adapt", ADAPT_FAMILIES, 30),
    ("target/test", TEST_FAMILIES, 30),
]
# Random streams are disjoint from those of fonts36 (split ids 1-4 there).
SPLIT_IDS = {"target/adapt": 11, "target/test": 12}

# Degradations: probability of being applied and parameter ranges. At least
# MIN_APPLIED of skew, low contrast, gradient, blur, noise and JPEG are
# applied to every image. Noise (which PNG cannot compress) and the image
# count are sized to keep the archive under 6 MB.
P_SKEW, SKEW_CORNER_FRAC = 0.75, (0.03, 0.08)   # corner displacement / side
P_LOW_CONTRAST = 0.8
PAPER_LOW, INK_LOW = (150, 210), (60, 120)      # low-contrast grey levels
MIN_CONTRAST = 60                               # paper - ink, low contrast
PAPER_NORMAL, INK_NORMAL = (215, 245), (15, 50)  # when contrast is not lowered
P_GRADIENT, GRADIENT_DROP = 0.75, (0.2, 0.5)    # darkest corner: 1 - drop
P_BLUR, BLUR_SIGMA = 0.8, (1.2, 2.5)            # px (= Pillow blur radius)
P_NOISE, NOISE_SIGMA = 0.8, (4.0, 9.0)          # grey levels
P_JPEG, JPEG_QUALITY = 0.7, (20, 50)
MIN_APPLIED = 3
P_INVERT = 0.25                                 # light glyph on dark ground
LEVELS = 32                                     # grey levels of noisy images
SKEW_MARGIN_PX = 1                              # ink kept this far from edges


def sample_rngs(seed, split, cls_idx, n):
    """Independent streams for the glyph and for the camera degradations."""
    key = [seed, SPLIT_IDS[split], cls_idx, n]
    return np.random.default_rng(key + [0]), np.random.default_rng(key + [1])


def homography(src, dst):
    """Coefficients for Image.transform(PERSPECTIVE) mapping dst to src."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return tuple(float(c) for c in np.linalg.solve(np.array(a, float), np.array(b, float)))


def skew(cov, rng):
    """Random perspective warp of an ink coverage image (L, 255 = ink).

    The corner displacement is halved until the ink stays inside the image.
    """
    size = cov.width
    corners = [(0, 0), (size, 0), (size, size), (0, size)]
    frac = rng.uniform(*SKEW_CORNER_FRAC)
    dirs = rng.uniform(-1.0, 1.0, size=(4, 2))
    for _ in range(4):
        dst = [(x + dx * frac * size, y + dy * frac * size)
               for (x, y), (dx, dy) in zip(corners, dirs)]
        out = cov.transform(cov.size, Image.PERSPECTIVE, homography(corners, dst),
                            resample=Image.BICUBIC, fillcolor=0)
        box = out.point(lambda v: 255 if v > 8 else 0).getbbox()
        if box and min(box[0], box[1], size - box[2], size - box[3]) >= SKEW_MARGIN_PX:
            return out, float(frac)
        frac /= 2.0
    return cov, 0.0


def gaussian_blur(img, sigma):
    """Separable Gaussian blur of a float image, edges replicated."""
    r = int(np.ceil(3.0 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(img, r, mode="edge")
    h, w = img.shape
    tmp = sum(k[i] * p[:, i:i + w] for i in range(2 * r + 1))
    return sum(k[i] * tmp[i:i + h, :] for i in range(2 * r + 1))


def choose(rng):
    """Flags for skew, low contrast, gradient, blur, noise and JPEG."""
    probs = [P_SKEW, P_LOW_CONTRAST, P_GRADIENT, P_BLUR, P_NOISE, P_JPEG]
    on = rng.uniform(size=len(probs)) < np.array(probs)
    for i in rng.permutation(len(probs)):  # top up to MIN_APPLIED
        if on.sum() >= MIN_APPLIED:
            break
        on[i] = True
    return [bool(v) for v in on]


def camera(clean, rng, levels=LEVELS):
    """Apply the camera degradations to a clean glyph (L, dark on white).

    Returns the degraded L image and {degradation: parameter} for those
    applied.
    """
    size = clean.width
    do_skew, do_contrast, do_gradient, do_blur, do_noise, do_jpeg = choose(rng)
    invert = bool(rng.uniform() < P_INVERT)
    rec = {}

    cov = Image.eval(clean, lambda v: 255 - v)
    if do_skew:
        cov, rec["skew"] = skew(cov, rng)
    a = np.asarray(cov, dtype=np.float64) / 255.0

    if do_contrast:
        paper = rng.uniform(*PAPER_LOW)
        ink = rng.uniform(INK_LOW[0], min(INK_LOW[1], paper - MIN_CONTRAST))
        rec["low_contrast"] = [float(paper), float(ink)]
    else:
        paper = rng.uniform(*PAPER_NORMAL)
        ink = rng.uniform(*INK_NORMAL)
    if invert:
        paper, ink = ink, paper
        rec["inverted"] = 1
    img = paper * (1.0 - a) + ink * a

    if do_gradient:
        theta = rng.uniform(0.0, 2.0 * np.pi)
        drop = rng.uniform(*GRADIENT_DROP)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0) - 0.5
        t = xx * np.cos(theta) + yy * np.sin(theta)
        t = (t - t.min()) / (t.max() - t.min())
        img = img * (1.0 - drop * t)
        rec["gradient"] = float(drop)
    if do_blur:
        rec["blur"] = float(rng.uniform(*BLUR_SIGMA))
        img = gaussian_blur(img, rec["blur"])
    if do_noise:
        rec["noise"] = float(rng.uniform(*NOISE_SIGMA))
        img = img + rng.normal(0.0, rec["noise"], size=img.shape)
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "L")
    if do_jpeg:
        buf = io.BytesIO()
        rec["jpeg"] = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        out.save(buf, "JPEG", quality=rec["jpeg"])
        buf.seek(0)
        out = Image.open(buf).convert("L")
    if do_noise:
        # the noise hides the steps; noise-free images keep 256 levels
        out = g.quantize(out, levels)
    return out, rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help=f"output directory; {NAME}/ is created inside")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--levels", type=int, default=LEVELS,
                    help="grey levels kept in images with sensor noise (smaller PNGs); "
                         "256 = no quantisation")
    ap.add_argument("--scale-counts", type=float, default=1.0,
                    help="multiply per-class counts (for quick tests)")
    ap.add_argument("--skip-font-check", action="store_true")
    args = ap.parse_args()

    if not args.skip_font_check:
        bad = g.check_fonts(SPLITS)
        if bad:
            sys.exit("font check failed:\n  " + "\n  ".join(bad))

    cache = g.FontCache()
    root = os.path.join(args.out, NAME)
    meta = {
        "name": NAME,
        "generator": "tools/fonts36/camera.py",
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "image_size": [args.size, args.size],
        "channels": 1,
        "grey_levels": {"with_noise": args.levels, "without_noise": 256},
        "format": "PNG, 8-bit grayscale; dark glyph on a light background, "
                  "light on dark when inverted",
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
        "classes": g.CLASSES,
        "glyph_augmentation": g.augmentation_meta(),
        "family_split": "fonts36 source families alternate between the "
                        "splits: even positions -> target/adapt, odd -> "
                        "target/test",
        "degradations": {
            "order": ["skew", "contrast and polarity", "gradient", "blur",
                      "noise", "jpeg"],
            "min_applied": MIN_APPLIED,
            "min_applied_of": ["skew", "low_contrast", "gradient", "blur",
                               "noise", "jpeg"],
            "skew": {"p": P_SKEW, "kind": "perspective, each corner moved by "
                     "up to frac * side in x and y; halved until ink fits",
                     "corner_frac": list(SKEW_CORNER_FRAC)},
            "low_contrast": {"p": P_LOW_CONTRAST, "paper": list(PAPER_LOW),
                             "ink": list(INK_LOW), "min_paper_minus_ink": MIN_CONTRAST},
            "normal_contrast": {"p": round(1 - P_LOW_CONTRAST, 6),
                                "paper": list(PAPER_NORMAL), "ink": list(INK_NORMAL)},
            "gradient": {"p": P_GRADIENT, "kind": "linear multiplicative "
                         "illumination, random direction, 1 to 1 - drop",
                         "drop": list(GRADIENT_DROP)},
            "blur": {"p": P_BLUR, "kind": "Gaussian (defocus)",
                     "sigma_px": list(BLUR_SIGMA)},
            "noise": {"p": P_NOISE, "kind": "additive Gaussian; image then "
                      "stored with grey_levels.with_noise levels",
                      "sigma_grey_levels": list(NOISE_SIGMA)},
            "jpeg": {"p": P_JPEG, "quality": list(JPEG_QUALITY),
                     "note": "encoded, decoded and stored as PNG"},
            "inverted": {"p": P_INVERT, "kind": "paper and ink grey levels "
                         "swapped (light glyph on dark background)"},
        },
        "splits": {},
    }

    total = 0
    for split, families, per_class in SPLITS:
        count = max(1, int(round(per_class * args.scale_counts)))
        usage, applied = {}, {}
        for ci, ch in enumerate(g.CLASSES):
            d = os.path.join(root, split, ch)
            os.makedirs(d, exist_ok=True)
            for n in range(count):
                _, rel = g.pick_font(families, n)
                glyph_rng, cam_rng = sample_rngs(args.seed, split, ci, n)
                clean = g.render(cache.get(rel), ch, glyph_rng, args.size, 256)
                img, rec = camera(clean, cam_rng, args.levels)
                img.save(os.path.join(d, f"{n}.png"), optimize=True)
                usage[rel] = usage.get(rel, 0) + 1
                for k, v in rec.items():
                    if v:  # a skew may fall back to none
                        applied[k] = applied.get(k, 0) + 1
                total += 1
        meta["splits"][split] = {
            "per_class_count": {c: count for c in g.CLASSES},
            "total": count * len(g.CLASSES),
            "images_with_degradation": dict(sorted(applied.items())),
            "families": g.families_meta(families, usage),
        }
        print(f"{split}: {count * len(g.CLASSES)} images", file=sys.stderr)

    meta["total_images"] = total
    with open(os.path.join(root, "DATASET.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
