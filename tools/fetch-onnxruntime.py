#!/usr/bin/env python3
"""Fetch the pinned ONNX Runtime shared library into edgeadapt's cache.

The library comes from the official `onnxruntime` wheel on PyPI. The wheel is
downloaded with pip (so pip's index configuration applies), its sha256 is checked
against the pin below, and `libonnxruntime.so.<version>` is extracted to

    ${EDGEADAPT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/edgeadapt}/onnxruntime/<version>-<arch>/

which is the last place edgeadapt looks for the library (after `ort_library` in the
device config and `ORT_DYLIB_PATH`). Re-running is cheap: a verified copy is kept.

With `--gpu` (x86_64 only) it fetches the official `onnxruntime-gpu` wheel instead, built for
CUDA 13 and cuDNN 9 with the CUDA and TensorRT execution providers, into
`<version>-x86_64-gpu/`, and prints the path to give `runtime.ort_library` or ORT_DYLIB_PATH
(docs/gpu.md). The CUDA, cuDNN and TensorRT libraries themselves come from NVIDIA.

On Jetson, point the device config or ORT_DYLIB_PATH at JetPack's build instead:
the PyPI wheel for aarch64 carries only the CPU execution provider.
"""

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile

VERSION = "1.31.1"
# Wheel file name and sha256 per machine architecture (cp311 tag: the native library
# inside is the same for every Python version).
WHEELS = {
    "x86_64": (
        "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
        "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
        "manylinux_2_28_x86_64",
    ),
    "aarch64": (
        "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_aarch64.whl",
        "da05378364c44d4407e463982d2bf8d5e4cfea873283757e48beeb41df97b7f3",
        "manylinux_2_28_aarch64",
    ),
}
# The GPU build (`onnxruntime-gpu`), x86_64 only.
GPU_WHEEL = (
    "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl",
    "05d548956197b9d01f59b625de740e0d6be3593f874e241a12dc0362650ecdf7",
    "manylinux_2_28_x86_64",
)
LIBRARY = f"libonnxruntime.so.{VERSION}"
MEMBERS = [f"onnxruntime/capi/{LIBRARY}", "onnxruntime/capi/libonnxruntime_providers_shared.so"]
GPU_MEMBERS = MEMBERS + [
    "onnxruntime/capi/libonnxruntime_providers_cuda.so",
    "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
]


def cache_root() -> str:
    if os.environ.get("EDGEADAPT_CACHE"):
        return os.environ["EDGEADAPT_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "edgeadapt")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=platform.machine(), help="x86_64 or aarch64")
    parser.add_argument("--gpu", action="store_true", help="the onnxruntime-gpu build (CUDA, TensorRT)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    if args.gpu:
        if args.arch != "x86_64":
            print("error: PyPI's onnxruntime-gpu is for x86_64 only; on Jetson use JetPack's build "
                  "(cross/README.md)", file=sys.stderr)
            return 2
        (wheel_name, wheel_sha256, platform_tag), package, members, python = GPU_WHEEL, "onnxruntime-gpu", GPU_MEMBERS, "3.12"
        target_dir = os.path.join(cache_root(), "onnxruntime", f"{VERSION}-{args.arch}-gpu")
    elif args.arch not in WHEELS:
        print(f"error: no pinned onnxruntime wheel for architecture '{args.arch}' "
              f"(pinned: {', '.join(WHEELS)})", file=sys.stderr)
        return 2
    else:
        (wheel_name, wheel_sha256, platform_tag), package, members, python = WHEELS[args.arch], "onnxruntime", MEMBERS, "3.11"
        target_dir = os.path.join(cache_root(), "onnxruntime", f"{VERSION}-{args.arch}")
    stamp = os.path.join(target_dir, "WHEEL_SHA256")
    library_path = os.path.join(target_dir, LIBRARY)

    if os.path.isfile(library_path) and os.path.isfile(stamp):
        with open(stamp) as handle:
            if handle.read().strip() == wheel_sha256:
                if not args.quiet:
                    print(library_path)
                return 0

    print(f"Fetching ONNX Runtime {VERSION} ({package} wheel from PyPI, checked against its pinned sha256) "
          f"into {target_dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as download_dir:
        command = [
            sys.executable, "-m", "pip", "download", f"{package}=={VERSION}", "--no-deps",
            "--only-binary=:all:", "--python-version", python, "--platform", platform_tag,
            "--dest", download_dir, "--quiet", "--disable-pip-version-check",
        ]
        subprocess.run(command, check=True)
        wheel_path = os.path.join(download_dir, wheel_name)
        if not os.path.isfile(wheel_path):
            print(f"error: pip did not produce {wheel_name} in {download_dir}: {os.listdir(download_dir)}",
                  file=sys.stderr)
            return 1
        actual = sha256_of(wheel_path)
        if actual != wheel_sha256:
            print(f"error: {wheel_name} has sha256 {actual}, expected {wheel_sha256}; refusing it",
                  file=sys.stderr)
            return 1
        staging = target_dir + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        with zipfile.ZipFile(wheel_path) as wheel:
            for member in members:
                with wheel.open(member) as source, open(os.path.join(staging, os.path.basename(member)), "wb") as sink:
                    shutil.copyfileobj(source, sink)
        with open(os.path.join(staging, "WHEEL_SHA256"), "w") as handle:
            handle.write(wheel_sha256 + "\n")
        shutil.rmtree(target_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(target_dir), exist_ok=True)
        os.rename(staging, target_dir)
    if not args.quiet:
        print(library_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
