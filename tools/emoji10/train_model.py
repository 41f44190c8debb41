#!/usr/bin/env python3
"""Train a small CNN on emoji10 source/train and export it as ONNX.

The model plays the part of a user's own classifier, brought to edgeadapt with
`import-onnx`: a plain CNN on 64x64 RGB input (mean/std 0.5), trained only on
the source domain (product shots). Its tail is made of layers edgeadapt can
train (Conv 1x1, ReLU, GlobalAveragePool, Flatten), then Linear(256, 10).

Outputs: the ONNX model and a PyTorch checkpoint under target/emoji10-model/,
and tools/emoji10/metrics.json (accuracy per split, per class, per vendor).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
SPLITS = ("source/train", "source/test", "target/adapt", "target/test")
VENDORS = ("noto", "twemoji", "openmoji")  # image n of a class uses vendor n mod 3


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_classes(path):
    return [line.strip() for line in open(path) if line.strip()]


def load_split(root, split, classes, limit=None):
    imgs, labels, index = [], [], []
    for ci, c in enumerate(classes):
        d = root / split / c
        files = sorted(d.glob("*.jpg"), key=lambda p: int(p.stem))
        if limit:
            files = files[:limit]
        for f in files:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(ci)
            index.append(int(f.stem))
    return np.stack(imgs), np.array(labels, dtype=np.int64), np.array(index, dtype=np.int64)


def to_input(imgs_u8):
    """uint8 [N,H,W,3] -> normalised float32 [N,3,H,W], exactly as edgeadapt preprocesses."""
    x = torch.from_numpy(imgs_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# ------------------------------------------------------------------------- model

def conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Emoji10CNN(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.trunk = nn.Sequential(
            *conv_bn_relu(3, 32), nn.MaxPool2d(2),      # 32 x 32
            *conv_bn_relu(32, 64), nn.MaxPool2d(2),     # 16 x 16
            *conv_bn_relu(64, 128), nn.MaxPool2d(2),    # 8 x 8
            *conv_bn_relu(128, 128),                    # 8 x 8
        )
        self.tail = nn.Sequential(
            nn.Conv2d(128, 256, 1, bias=True), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.classifier(self.tail(self.trunk(x)))


# -------------------------------------------------------------------- augmentation

def augment(x, gen):
    """Source-style augmentation on a normalised batch: small affine, flip, colour jitter.

    No scene clutter, colour casts or noise: the model never sees target-style images."""
    n = x.shape[0]

    def uni(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    ang = uni(-10, 10) * math.pi / 180
    scale = uni(0.85, 1.10)
    tx, ty = uni(-0.08, 0.08), uni(-0.08, 0.08)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # colour jitter in [0, 1] space
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    v = x * s + m
    v = v * uni(0.8, 1.2, 1, 1, 1)                                        # brightness
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = mean + (v - mean) * uni(0.8, 1.2, 1, 1, 1)                        # contrast
    grey = (0.299 * v[:, 0:1] + 0.587 * v[:, 1:2] + 0.114 * v[:, 2:3])
    v = grey + (v - grey) * uni(0.8, 1.2, 1, 1, 1)                        # saturation
    v = v.clamp(0, 1)
    return (v - m) / s


# ------------------------------------------------------------------------ training

def train(model, imgs, labels, args):
    gen = torch.Generator().manual_seed(args.seed)
    x_all = to_input(imgs)
    y_all = torch.from_numpy(labels)
    n = len(y_all)
    steps_per_epoch = n // args.batch
    total = steps_per_epoch * args.epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch:(b + 1) * args.batch]
            xb = augment(x_all[idx], gen)
            yb = y_all[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        seen = steps_per_epoch * args.batch
        log(f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.4f}, "
            f"train acc (augmented) {correct / seen:.4f}, {time.time() - t0:.0f}s")
    return time.time() - t0


@torch.no_grad()
def predict(model, imgs, batch=256):
    model.eval()
    return np.concatenate([model(to_input(imgs[i:i + batch])).numpy() for i in range(0, len(imgs), batch)])


def split_metrics(logits, labels, index, classes):
    pred = logits.argmax(1)
    ok = pred == labels
    out = {"images": int(len(labels)), "accuracy": round(float(ok.mean()), 4),
           "per_class": {c: round(float(ok[labels == ci].mean()), 4) for ci, c in enumerate(classes)},
           "per_vendor": {v: round(float(ok[index % 3 == vi].mean()), 4) for vi, v in enumerate(VENDORS)}}
    conf = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(labels, pred):
        conf[t, p] += 1
    out["confusion"] = {"rows": "true class", "cols": "predicted class", "matrix": conf.tolist()}
    return out


def severities(data_root, split, labels, index, classes):
    """Each target image's severity, replayed from generate.py's random stream (its first draw)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import generate
    meta = json.load(open(data_root / "DATASET.json"))
    power = meta["target_domain"]["severity_power"]
    folder_index = {c: i for i, (c, _, _) in enumerate(generate.CLASSES)}
    return np.array([float(generate.sample_rng(meta["seed"], split, folder_index[classes[c]], int(n)).random())
                     ** power for c, n in zip(labels, index)])


# -------------------------------------------------------------------------- export

def onnx_rename(g, old, new):
    for n in g.node:
        for i, s in enumerate(n.input):
            if s == old:
                n.input[i] = new
        for i, s in enumerate(n.output):
            if s == old:
                n.output[i] = new
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == old:
            vi.name = new


def export_onnx(model, path, opset):
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), str(path),
        dynamo=False,  # TorchScript exporter; folds BatchNorm into the convs in eval mode
        export_params=True, opset_version=opset, do_constant_folding=True,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )
    m = onnx.load(str(path))
    g = m.graph
    gemms = [n for n in g.node if n.op_type == "Gemm"]
    assert len(gemms) == 1, f"expected one Gemm, found {len(gemms)}"
    onnx_rename(g, gemms[0].input[0], "features")
    assert not any(n.op_type == "BatchNormalization" for n in g.node), "BatchNormalization left"
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    # the layers after the last 3x3 conv, up to the logits
    producer = {o: n for n in m.graph.node for o in n.output}
    chain, cur = [], "logits"
    while cur in producer:
        n = producer[cur]
        chain.append(n.op_type)
        if n.op_type == "Conv" and any(
                a.name == "kernel_shape" and list(a.ints) == [3, 3] for a in n.attribute):
            break
        cur = n.input[0]
    chain.reverse()
    return ops, chain


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "target/data/emoji10")
    ap.add_argument("--classes", type=Path, default=ROOT / "tools/emoji10/classes.txt")
    ap.add_argument("--onnx", type=Path, default=ROOT / "target/emoji10-model/emoji10_cnn.onnx")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "target/emoji10-model/emoji10_cnn.pt")
    ap.add_argument("--metrics", type=Path, default=ROOT / "tools/emoji10/metrics.json")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--limit-per-class", type=int, default=None, help="for quick smoke tests only")
    ap.add_argument("--from-checkpoint", action="store_true",
                    help="skip training; load --checkpoint written by an earlier run")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    import onnx
    import onnxruntime as ort
    import PIL
    versions = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": ort.__version__, "numpy": np.__version__, "pillow": PIL.__version__}
    log(f"versions: {versions}")

    classes = read_classes(args.classes)
    data = {s: load_split(args.data, s, classes, args.limit_per_class) for s in SPLITS}
    for s in SPLITS:
        log(f"loaded {s}: {len(data[s][1])} images")

    model = Emoji10CNN(len(classes))
    params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {params}")
    if args.from_checkpoint:
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        train_time = ck["train_time_s"]
    else:
        train_time = train(model, data["source/train"][0], data["source/train"][1], args)
        log(f"training done in {train_time:.0f}s")
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "train_time_s": train_time}, args.checkpoint)
    model.eval()

    results, logits_ref = {}, {}
    for s in SPLITS:
        imgs, labels, index = data[s]
        logits_ref[s] = predict(model, imgs)
        results[s] = split_metrics(logits_ref[s], labels, index, classes)
        log(f"accuracy {s}: {results[s]['accuracy']:.4f}  per class: "
            + " ".join(f"{c}:{a:.2f}" for c, a in results[s]["per_class"].items())
            + "  per vendor: " + " ".join(f"{v}:{a:.2f}" for v, a in results[s]["per_vendor"].items()))

    for s in ("target/adapt", "target/test"):
        _, labels, index = data[s]
        sev = severities(args.data, s, labels, index, classes)
        ok = logits_ref[s].argmax(1) == labels
        fifths = np.minimum((sev * 5).astype(int), 4)
        results[s]["by_severity_fifth"] = {
            "images": [int((fifths == k).sum()) for k in range(5)],
            "accuracy": [round(float(ok[fifths == k].mean()), 4) if (fifths == k).any() else None
                         for k in range(5)]}
        log(f"{s} by severity fifth: {results[s]['by_severity_fifth']}")

    ops, chain = export_onnx(model, args.onnx, args.opset)
    onnx_sha = sha256(args.onnx)
    log(f"exported {args.onnx} ({args.onnx.stat().st_size} bytes, sha256 {onnx_sha}); ops {ops}")
    log(f"after the last 3x3 conv: {' -> '.join(chain)}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.onnx), so, providers=["CPUExecutionProvider"])
    ort_check = {}
    for s in ("source/test", "target/test"):
        imgs, labels, _ = data[s]
        lg = np.concatenate([sess.run(["logits"], {"image": to_input(imgs[i:i + 256]).numpy()})[0]
                             for i in range(0, len(imgs), 256)])
        ort_check[s] = {"accuracy": round(float((lg.argmax(1) == labels).mean()), 4),
                        "max_abs_logit_diff_vs_pytorch": float(np.abs(lg - logits_ref[s]).max()),
                        "argmax_disagreements": int((lg.argmax(1) != logits_ref[s].argmax(1)).sum())}
        log(f"onnxruntime {s}: {ort_check[s]}")

    metrics = {
        "model": "small CNN (emoji10-cnn) trained on emoji10 source/train",
        "onnx_file": str(args.onnx.relative_to(ROOT)) if args.onnx.is_relative_to(ROOT) else str(args.onnx),
        "onnx_sha256": onnx_sha,
        "onnx_bytes": args.onnx.stat().st_size,
        "opset": args.opset,
        "classes": classes,
        "parameters": params,
        "architecture": [
            "Conv3x3(3->32)+BN+ReLU, MaxPool2",
            "Conv3x3(32->64)+BN+ReLU, MaxPool2",
            "Conv3x3(64->128)+BN+ReLU, MaxPool2",
            "Conv3x3(128->128)+BN+ReLU",
            "Conv1x1(128->256, bias)+ReLU, GlobalAveragePool, Flatten -> features [256]",
            "Linear(256->10) -> logits",
        ],
        "onnx_ops": ops,
        "onnx_chain_after_last_3x3_conv": chain,
        "input": {"name": "image", "shape": ["N", 3, IMAGE_SIZE, IMAGE_SIZE], "color": "rgb",
                  "scale": "x / 255", "mean": list(MEAN), "std": list(STD)},
        "accuracy": {s: results[s]["accuracy"] for s in SPLITS},
        "splits": results,
        "onnxruntime_check": ort_check,
        "train_time_s": round(train_time, 1),
        "hyperparameters": {"epochs": args.epochs, "batch": args.batch, "optimizer": "AdamW", "lr": args.lr,
                            "weight_decay": args.wd, "schedule": "5% linear warm-up + cosine",
                            "augmentation": "affine (rotation +-10 deg, scale 0.85-1.10, shift +-8 %, border fill), "
                                            "horizontal flip, brightness/contrast/saturation 0.8-1.2",
                            "seed": args.seed, "threads": args.threads,
                            "limit_per_class": args.limit_per_class},
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
        "versions": versions,
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2)
    # one line per list of numbers (the confusion matrices would take hundreds of lines)
    text = re.sub(r"\[\s+([-0-9.e,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(args.metrics, "w") as f:
        f.write(text + "\n")
    log(f"wrote {args.metrics}")


if __name__ == "__main__":
    sys.exit(main())
