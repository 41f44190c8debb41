#!/usr/bin/env python3
"""Generate the emoji10 scene-shift benchmark.

Ten object emoji, each in three vendor designs (Noto Color Emoji, Twemoji,
OpenMoji). Source domain: product shots, the object large and centred on a
plain light background. Target domain: a site camera, the object anywhere and
mostly smaller, in a cluttered scene (wallpaper crops and partial distractor
emoji) under a colour cast, low exposure and contrast, sensor noise and JPEG,
with a per-image severity that scales these together.

Output layout (ImageFolder):
    OUT/emoji10/source/train/<class>/<n>.jpg
    OUT/emoji10/source/test/<class>/<n>.jpg
    OUT/emoji10/target/adapt/<class>/<n>.jpg
    OUT/emoji10/target/test/<class>/<n>.jpg
    OUT/emoji10/DATASET.json
    OUT/emoji10/ATTRIBUTION.md

Every image is a 64x64 RGB JPEG. Each image is drawn from its own random
stream derived from (seed, split, class, index), so the output is
byte-identical for a given seed, asset versions (fetch-assets.sh) and pinned
library versions (requirements.txt).
"""

import argparse
import hashlib
import io
import json
import os
import sys

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

GENERATOR_VERSION = "1.1.0"  # 1.1.0: design 2 is OpenMoji

# (folder name, code point(s) in hex as the vendors name their files, Unicode name)
CLASSES = [
    ("apple", "1f34e", "red apple"),
    ("banana", "1f34c", "banana"),
    ("car", "1f697", "automobile"),
    ("bicycle", "1f6b2", "bicycle"),
    ("fish", "1f41f", "fish"),
    ("bird", "1f426", "bird"),
    ("key", "1f511", "key"),
    ("umbrella", "2602", "umbrella"),
    ("clock", "23f0", "alarm clock"),
    ("shoe", "1f45f", "running shoe"),
]

# Distractor emoji (none is one of the classes or close to one); disjoint between the target
# splits so that target/test has clutter never seen in target/adapt.
DISTRACTORS = {
    "target/adapt": [
        ("1f333", "deciduous tree"), ("1f4e6", "package"), ("1f527", "wrench"),
        ("1f4f1", "mobile phone"), ("1f388", "balloon"), ("1f3c0", "basketball"),
        ("1f4d7", "green book"), ("1f9f1", "brick"), ("1f30d", "globe showing Europe-Africa"),
        ("1f381", "wrapped gift"),
    ],
    "target/test": [
        ("1f335", "cactus"), ("1f4a1", "light bulb"), ("1f528", "hammer"),
        ("1f4bb", "laptop"), ("26bd", "soccer ball"), ("1f56f", "candle"),
        ("1f3b8", "guitar"), ("1f9ef", "fire extinguisher"), ("1f4da", "books"),
        ("1f6aa", "door"),
    ],
}

# Raster wallpapers of gnome-backgrounds, split by design (light and dark variant together).
# vnc-l/vnc-d (256x256 flat colours) are not used: they are not clutter.
BACKGROUNDS = {
    "target/adapt": ["adwaita-l", "adwaita-d", "licorice-l", "licorice-d",
                     "pixels-l", "pixels-d", "wood-l", "wood-d"],
    "target/test": ["grid-l", "grid-d", "truchet-l", "truchet-d", "symbolic-l", "symbolic-d"],
}

# (split, per-class count, domain)
SPLITS = [
    ("source/train", 200, "source"),
    ("source/test", 40, "source"),
    ("target/adapt", 60, "target"),
    ("target/test", 60, "target"),
]
SPLIT_IDS = {s: i for i, (s, _, _) in enumerate(SPLITS)}

VENDORS = ["noto", "twemoji", "openmoji"]
PACKAGES = {
    "noto": ("fonts-noto-color-emoji", "2.042-0+deb12u1", "deb",
             "SIL-1.1 (OFL-1.1) for fonts/*, Apache-2.0 for the other files; "
             "Copyright 2013-2017 Google Inc., Arjen Nienhuis (per the package's copyright file)"),
    "twemoji": ("@twemoji/svg", "15.0.0", "npm",
                "package: MIT (its license file, Copyright (c) 2023 Samuel Kopp; it states nothing "
                "about the graphics); graphics: CC-BY-4.0, Copyright 2019 Twitter, Inc and other "
                "contributors (upstream jdecked/twemoji README and LICENSE-GRAPHICS)"),
    "openmoji": ("openmoji", "17.0.0", "npm",
                 "CC-BY-SA-4.0 (OpenMoji graphics; the package's LICENSE.txt, README and package.json)"),
    "backgrounds": ("gnome-backgrounds", "43.1-1", "deb",
                    "CC-BY-SA-3.0 (the package's copyright file: adwaita* by Jakub Steiner; the other "
                    "files used are not named there)"),
}

# Credit lines required by the licences of the artwork (CC-BY-4.0, CC-BY-SA-4.0, CC-BY-SA-3.0),
# written to DATASET.json ("attribution") and, with a header, to emoji10/ATTRIBUTION.md.
ATTRIBUTION_LINES = [
    "Noto Color Emoji: Copyright 2013-2017 Google Inc. and Arjen Nienhuis; the font is licensed "
    "under the SIL Open Font License 1.1, the other files of noto-emoji under the Apache License 2.0 "
    "(Debian package fonts-noto-color-emoji 2.042-0+deb12u1; https://github.com/googlefonts/noto-emoji).",
    "Twemoji: Copyright 2019 Twitter, Inc and other contributors. Graphics licensed under CC-BY 4.0: "
    "https://creativecommons.org/licenses/by/4.0/ (https://github.com/jdecked/twemoji; SVG files from "
    "the npm package @twemoji/svg 15.0.0, MIT, Copyright (c) 2023 Samuel Kopp).",
    "OpenMoji: All emojis designed by OpenMoji – the open-source emoji and icon project. License: "
    "CC BY-SA 4.0 (https://openmoji.org/, https://creativecommons.org/licenses/by-sa/4.0/; npm package "
    "openmoji 17.0.0).",
    "Wallpapers: GNOME, gnome-backgrounds 43.1 (Debian package 43.1-1, https://gitlab.gnome.org/"
    "GNOME/gnome-backgrounds), Creative Commons Attribution-ShareAlike 3.0 "
    "(https://creativecommons.org/licenses/by-sa/3.0/); the package's copyright file gives this "
    "licence and Copyright 2011 Jakub Steiner for adwaita*, and does not name the other files used "
    "(licorice, pixels, wood, grid, truchet, symbolic; -l and -d of each).",
    "Changes: the emoji were rendered to bitmaps, cropped, rotated, scaled and composited on plain "
    "backgrounds or on crops of the wallpapers with partial distractor emoji; the wallpaper crops were "
    "rotated, flipped, blurred and blended with grey; colour casts, exposure, contrast, noise and JPEG "
    "compression were applied; every image was downsampled to 64 x 64. The authors of these works do "
    "not endorse this data set.",
    "The emoji10 images are adaptations of this material and are licensed under CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/), as the ShareAlike terms of OpenMoji's licence "
    "and of the wallpapers' CC BY-SA 3.0 (which allows a later version) require. They are provided as "
    "is, without warranties.",
]
ATTRIBUTION_MD = ("# emoji10: attribution and licence\n\n"
                  "The images of this data set are composed from the following works.\n\n"
                  + "".join(f"- {line}\n" for line in ATTRIBUTION_LINES))
NOTO_FONT = "fonts-noto-color-emoji/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_SIZE = 109  # the only bitmap strike of the CBDT font
TWEMOJI_DIR = "npm-twemoji-svg/package"
OPENMOJI_DIR = "npm-openmoji/package/color/svg"  # file names in upper case
# SVG designs: folder and file name of a code point.
SVG_FILES = {"twemoji": (TWEMOJI_DIR, lambda cp: cp), "openmoji": (OPENMOJI_DIR, str.upper)}
BACKGROUND_DIR = "gnome-backgrounds/usr/share/backgrounds/gnome"

SIZE = 64      # stored image size
WORK = 128     # images are composed at this size, then downsampled
SPRITE = 256   # longer side of the cached sprite (before crop)
BG_CACHE = 1024  # wallpapers are kept downscaled to this size
JPEG_QUALITY = 90

# Source domain ("product shots")
SRC = {
    "object_fraction": (0.70, 0.95),   # longer side of the rotated object / image side
    "rotation_deg": (-10.0, 10.0),
    "centre_shift_fraction": (-0.04, 0.04),
    "background_grey": (215, 250),
    "background_tint": (-8, 8),        # added per channel
    "brightness": (0.92, 1.08),
}
# Target domain ("a site camera"). Each image draws a severity s = v ** SEVERITY_POWER with v
# uniform in [0, 1] (most frames in fair conditions, a tail of bad ones); every parameter in
# TGT_SEVERITY is then mild + (severe - mild) * t with t = s + U(-SEVERITY_JITTER, SEVERITY_JITTER)
# clipped to [0, 1], drawn separately per parameter. So conditions vary from image to image (from a
# large object in front of a washed-out, defocused background in fair light to a small one in
# sharp clutter under a strong cast) and the degradations of one image are correlated.
SEVERITY_POWER = 2.0
SEVERITY_JITTER = 0.15
TGT_SEVERITY = {  # name: (mild, severe)
    "object_fraction": (0.80, 0.35),        # longer side of the rotated object / image side
    "background_strength": (0.25, 0.90),    # wallpaper share; the rest is a flat grey
    "background_blur_px": (5.0, 0.0),       # Gaussian radius at the 128-px working size
    "cast_strength": (0.0, 1.0),            # 0: neutral gains, 1: CAST_GAINS
    "exposure": (1.00, 0.60),
    "contrast": (1.00, 0.65),
    "noise_sigma": (2.0, 7.0),              # grey levels, per channel, at 64x64
    "camera_jpeg_quality": (80, 45),
}
CAST_GAINS = {"warm": (1.08, 0.82, 0.50), "cool": (0.70, 0.90, 1.08)}  # (r, g, b) at strength 1
TGT = {  # drawn uniformly, independent of the severity
    "rotation_deg": (-10.0, 10.0),
    "background_crop_fraction": (0.08, 0.40),  # crop side / wallpaper side
    "background_grey": (170, 230),
    "distractors": (1, 3),
    "distractor_fraction": (0.30, 0.55),
    "distractor_rotation_deg": (-30.0, 30.0),
    "distractor_visible_fraction": (0.35, 0.75),  # of its extent across the frame edge
}


def sample_rng(seed, split, cls_idx, n):
    return np.random.default_rng([seed, SPLIT_IDS[split], cls_idx, n])


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def crop_alpha(im):
    box = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    return im.crop(box)


class Sprites:
    """RGBA renders of each (vendor, code point), cropped to their opaque pixels."""

    def __init__(self, assets):
        self.assets = assets
        self.cache = {}
        self.files = {}
        self.noto = ImageFont.truetype(os.path.join(assets, NOTO_FONT), NOTO_SIZE,
                                       layout_engine=ImageFont.Layout.BASIC)

    def get(self, vendor, cp):
        key = (vendor, cp)
        if key not in self.cache:
            self.cache[key] = crop_alpha(self._render(vendor, cp))
        return self.cache[key]

    def _render(self, vendor, cp):
        if vendor == "noto":
            text = "".join(chr(int(c, 16)) for c in cp.split("-"))
            self.files[key_name(vendor, cp)] = NOTO_FONT
            box = self.noto.getbbox(text)
            im = Image.new("RGBA", (box[2] + 8, box[3] + 8), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((4, 4), text, font=self.noto, embedded_color=True)
            if im.getchannel("A").getbbox() is None:
                raise SystemExit(f"Noto Color Emoji has no glyph for {cp}")
            return im
        if vendor in SVG_FILES:
            import cairosvg
            folder, name = SVG_FILES[vendor]
            rel = os.path.join(folder, f"{name(cp)}.svg")
            self.files[key_name(vendor, cp)] = rel
            png = cairosvg.svg2png(url=os.path.join(self.assets, rel),
                                   output_width=SPRITE, output_height=SPRITE)
            return Image.open(io.BytesIO(png)).convert("RGBA")
        raise ValueError(vendor)


def key_name(vendor, cp):
    return f"{vendor}:{cp}"


class Backgrounds:
    def __init__(self, assets):
        self.assets = assets
        self.cache = {}

    def path(self, name):
        return os.path.join(self.assets, BACKGROUND_DIR, f"{name}.webp")

    def get(self, name):
        if name not in self.cache:
            im = Image.open(self.path(name)).convert("RGB")
            self.cache[name] = im.resize((BG_CACHE, BG_CACHE), Image.Resampling.BOX)
        return self.cache[name]


def u(rng, lo_hi):
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def place_object(sprite, rng, fraction_range, rotation_range):
    """The sprite rotated and scaled so that its longer side is a fraction of WORK."""
    angle = u(rng, rotation_range)
    rot = crop_alpha(sprite.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True))
    frac = u(rng, fraction_range)
    scale = frac * WORK / max(rot.size)
    w = max(2, int(round(rot.size[0] * scale)))
    h = max(2, int(round(rot.size[1] * scale)))
    return rot.resize((w, h), Image.Resampling.LANCZOS), angle, frac


def source_image(sprite, rng):
    grey = u(rng, SRC["background_grey"])
    tint = rng.uniform(SRC["background_tint"][0], SRC["background_tint"][1], size=3)
    bg = tuple(int(round(min(255, max(0, grey + t)))) for t in tint)
    canvas = Image.new("RGBA", (WORK, WORK), bg + (255,))
    obj, angle, frac = place_object(sprite, rng, SRC["object_fraction"], SRC["rotation_deg"])
    dx, dy = (u(rng, SRC["centre_shift_fraction"]) * WORK for _ in range(2))
    x = int(round((WORK - obj.size[0]) / 2 + dx))
    y = int(round((WORK - obj.size[1]) / 2 + dy))
    x = min(max(x, 0), WORK - obj.size[0])
    y = min(max(y, 0), WORK - obj.size[1])
    canvas.alpha_composite(obj, (x, y))
    img = canvas.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.float32) * u(rng, SRC["brightness"])
    img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    return img, {"object_fraction": frac, "rotation_deg": angle}


def severe(rng, s, name):
    """Parameter `name` of TGT_SEVERITY for an image of severity `s`."""
    mild, hard = TGT_SEVERITY[name]
    t = min(1.0, max(0.0, s + float(rng.uniform(-SEVERITY_JITTER, SEVERITY_JITTER))))
    return mild + (hard - mild) * t


def background_crop(bgs, name, rng, s):
    im = bgs.get(name)
    side = int(round(u(rng, TGT["background_crop_fraction"]) * BG_CACHE))
    x = int(rng.integers(0, BG_CACHE - side + 1))
    y = int(rng.integers(0, BG_CACHE - side + 1))
    crop = im.crop((x, y, x + side, y + side)).resize((WORK, WORK), Image.Resampling.LANCZOS)
    turns = int(rng.integers(0, 4))
    if turns:
        crop = crop.transpose([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                               Image.Transpose.ROTATE_270][turns - 1])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    blur = severe(rng, s, "background_blur_px")
    if blur > 0:
        crop = crop.filter(ImageFilter.GaussianBlur(blur))
    strength = severe(rng, s, "background_strength")
    grey = u(rng, TGT["background_grey"])
    if strength < 1:
        a = np.asarray(crop, dtype=np.float32) * strength + grey * (1 - strength)
        crop = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    return crop.convert("RGBA")


def distractor_position(size, rng):
    """Top-left corner that leaves the sprite cut by one or two frame edges."""
    w, h = size
    pos = []
    edges = int(rng.integers(0, 4))  # which edge; a corner when the other axis is also cut
    corner = rng.random() < 0.3
    for axis, extent in ((0, w), (1, h)):
        cut_this = (edges % 2 == axis) or corner
        if cut_this:
            vis = u(rng, TGT["distractor_visible_fraction"])
            low_side = (edges // 2 == 0) if edges % 2 == axis else (rng.random() < 0.5)
            p = -int(round(extent * (1 - vis))) if low_side else WORK - int(round(extent * vis))
        else:
            p = int(rng.integers(0, max(1, WORK - extent + 1)))
        pos.append(p)
    return tuple(pos)


def target_image(sprite, sprites, bgs, split, rng):
    s = float(rng.random()) ** SEVERITY_POWER
    bg_name = BACKGROUNDS[split][int(rng.integers(0, len(BACKGROUNDS[split])))]
    canvas = background_crop(bgs, bg_name, rng, s)
    k = int(rng.integers(TGT["distractors"][0], TGT["distractors"][1] + 1))
    used = []
    for _ in range(k):
        cp, _name = DISTRACTORS[split][int(rng.integers(0, len(DISTRACTORS[split])))]
        vendor = VENDORS[int(rng.integers(0, len(VENDORS)))]
        d, _, _ = place_object(sprites.get(vendor, cp), rng, TGT["distractor_fraction"],
                               TGT["distractor_rotation_deg"])
        pos = distractor_position(d.size, rng)
        layer = Image.new("RGBA", (WORK, WORK), (0, 0, 0, 0))
        layer.paste(d, pos)
        canvas.alpha_composite(layer)
        used.append(cp)
    frac = severe(rng, s, "object_fraction")
    obj, angle, frac = place_object(sprite, rng, (frac, frac), TGT["rotation_deg"])
    x = int(rng.integers(0, WORK - obj.size[0] + 1))
    y = int(rng.integers(0, WORK - obj.size[1] + 1))
    canvas.alpha_composite(obj, (x, y))
    img = canvas.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)

    # camera: white balance, exposure, contrast, noise, JPEG
    cast = "warm" if rng.random() < 0.5 else "cool"
    strength = severe(rng, s, "cast_strength")
    gains = np.array([1.0 + (g - 1.0) * strength for g in CAST_GAINS[cast]], dtype=np.float32)
    exposure = severe(rng, s, "exposure")
    contrast = severe(rng, s, "contrast")
    sigma = severe(rng, s, "noise_sigma")
    quality = int(round(severe(rng, s, "camera_jpeg_quality")))
    a = np.asarray(img, dtype=np.float32) * gains * exposure
    mean = a.mean()
    a = mean + contrast * (a - mean)
    a = a + rng.normal(0.0, sigma, size=a.shape).astype(np.float32)
    img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img, {"background": bg_name, "distractors": used, "cast": cast, "severity": s,
                 "object_fraction": frac, "rotation_deg": angle}


def package_files(assets):
    out = {}
    for key, (name, version, kind, licence) in PACKAGES.items():
        if kind == "deb":
            f = f"dl/{name}_{version}_all.deb"
        else:
            base = name.lstrip("@").replace("/", "-")
            f = f"dl/{base}-{version}.tgz"
        p = os.path.join(assets, f)
        out[key] = {"package": name, "version": version, "registry": "Debian bookworm" if kind == "deb" else "npm",
                    "licence": licence, "file": os.path.basename(f),
                    "sha256": sha256(p) if os.path.exists(p) else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory; emoji10/ is created inside")
    ap.add_argument("--assets", default="target/emoji10-assets",
                    help="folder filled by tools/emoji10/fetch-assets.sh")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-counts", type=float, default=1.0,
                    help="multiply per-class counts (for quick tests)")
    args = ap.parse_args()

    if not os.path.isdir(args.assets):
        sys.exit(f"{args.assets} not found: run tools/emoji10/fetch-assets.sh first")
    sprites = Sprites(args.assets)
    bgs = Backgrounds(args.assets)
    root = os.path.join(args.out, "emoji10")
    names = [c[0] for c in CLASSES]
    meta = {
        "name": "emoji10",
        "generator": "tools/emoji10/generate.py",
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "image_size": [SIZE, SIZE],
        "channels": 3,
        "format": f"JPEG, RGB, quality {JPEG_QUALITY}",
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
        "classes": names,
        "class_emoji": [{"class": n, "code_point": cp, "unicode_name": un} for n, cp, un in CLASSES],
        "vendors": VENDORS,
        "vendor_rule": "image n of a class uses vendor n mod 3 (noto, twemoji, openmoji)",
        "attribution": ATTRIBUTION_LINES,
        "packages": package_files(args.assets),
        "source_domain": {"description": "product shot: object centred on a plain light background",
                          **{k: list(v) for k, v in SRC.items()}},
        "target_domain": {"description": "site camera: the object anywhere and mostly smaller, in a "
                                         "cluttered scene, colour cast, low exposure and contrast, "
                                         "noise, JPEG; a per-image severity scales these together",
                          "severity_power": SEVERITY_POWER, "severity_jitter": SEVERITY_JITTER,
                          "severity_rule": "each image draws s = v ** power, v uniform in [0, 1]; each "
                                           "parameter of `by_severity` is mild + (severe - mild) * t, "
                                           "t = clip(s + U(-jitter, jitter), 0, 1), drawn per parameter",
                          "by_severity": {k: {"mild": v[0], "severe": v[1]} for k, v in TGT_SEVERITY.items()},
                          "cast_gains_rgb_at_strength_1": {k: list(v) for k, v in CAST_GAINS.items()},
                          "cast_choice": "warm or cool with probability 1/2",
                          **{k: list(v) for k, v in TGT.items()},
                          "backgrounds": {s: [f"{BACKGROUND_DIR.split('/', 1)[1]}/{b}.webp"
                                              for b in v] for s, v in BACKGROUNDS.items()},
                          "distractors": {s: [{"code_point": cp, "unicode_name": un} for cp, un in v]
                                          for s, v in DISTRACTORS.items()}},
        "splits": {},
    }

    total = 0
    for split, per_class, domain in SPLITS:
        count = max(len(VENDORS), int(round(per_class * args.scale_counts)))
        vendor_usage = {v: 0 for v in VENDORS}
        bg_usage, dis_usage, cast_usage, severities = {}, {}, {"warm": 0, "cool": 0}, []
        for ci, (name, cp, _) in enumerate(CLASSES):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for n in range(count):
                vendor = VENDORS[n % len(VENDORS)]
                rng = sample_rng(args.seed, split, ci, n)
                sprite = sprites.get(vendor, cp)
                if domain == "source":
                    img, info = source_image(sprite, rng)
                else:
                    img, info = target_image(sprite, sprites, bgs, split, rng)
                    bg_usage[info["background"]] = bg_usage.get(info["background"], 0) + 1
                    for dcp in info["distractors"]:
                        dis_usage[dcp] = dis_usage.get(dcp, 0) + 1
                    cast_usage[info["cast"]] += 1
                    severities.append(info["severity"])
                img.save(os.path.join(d, f"{n}.jpg"), format="JPEG", quality=JPEG_QUALITY)
                vendor_usage[vendor] += 1
                total += 1
        entry = {"per_class_count": {c: count for c in names}, "total": count * len(CLASSES),
                 "images_per_vendor": vendor_usage}
        if domain == "target":
            entry["images_per_background"] = dict(sorted(bg_usage.items()))
            entry["distractor_uses"] = dict(sorted(dis_usage.items()))
            entry["images_per_cast"] = cast_usage
            hist, _ = np.histogram(severities, bins=5, range=(0.0, 1.0))
            entry["severity_mean"] = round(float(np.mean(severities)), 4)
            entry["images_per_severity_fifth"] = [int(h) for h in hist]
        meta["splits"][split] = entry
        print(f"{split}: {count * len(CLASSES)} images", file=sys.stderr)

    meta["background_files"] = {
        b: {"sha256": sha256(bgs.path(b))} for s in BACKGROUNDS for b in BACKGROUNDS[s]}
    meta["sprite_files"] = dict(sorted(sprites.files.items()))
    meta["total_images"] = total
    with open(os.path.join(root, "DATASET.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    with open(os.path.join(root, "ATTRIBUTION.md"), "w") as f:
        f.write(ATTRIBUTION_MD)


if __name__ == "__main__":
    main()
