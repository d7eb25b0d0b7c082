"""Compile the CUDA sources once and cache the result on disk, keyed by source hash, target and nvcc version.

Nothing compiles on the hot path: the GPU preprocessor loads a cached cubin (built on first use for the GPU's
architecture), and CI builds the host harness the same way.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from runtime.errors import Unavailable

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("preprocess.cuh", "preprocess.cu", "harness.cu")
# Device code flags: no FMA contraction, so FP32 results are bit-identical to numpy's separately rounded ops.
DEVICE_FLAGS = ("--fmad=false", "-O3", "-std=c++14")
HOST_FLAGS = ("-Xcompiler", "-fPIC,-ffp-contract=off", "-O2", "-std=c++14")


class KernelBuildError(Unavailable):
    """The kernel cannot be compiled here (no nvcc, or nvcc failed): GPU preprocessing is unavailable."""


def cache_dir() -> Path:
    base = os.environ.get("BREAKHIS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "breakhis-edge", "kernels")
    return Path(base)


def nvcc() -> str:
    found = shutil.which("nvcc") or next((str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.exists()), None)
    if not found:
        raise KernelBuildError("nvcc not found: install the CUDA toolkit (JetPack includes it) or put it on PATH")
    return found


@lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _key(target: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(f"{target}|{' '.join(flags)}|{nvcc_version()}".encode())
    return h.hexdigest()[:20]


def _build(target: str, suffix: str, args: list[str], flags: tuple[str, ...]) -> Path:
    out = cache_dir() / f"{target}-{_key(target, flags)}{suffix}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + f".{os.getpid()}.tmp")
    proc = subprocess.run([nvcc(), *flags, *args, "-o", str(tmp)], capture_output=True, text=True, cwd=KERNEL_DIR)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"nvcc failed for {target}:\n{proc.stderr.strip()}")
    tmp.replace(out)  # atomic: concurrent builders never see a half-written file
    return out


def build_cubin(arch: str) -> Path:
    """The preprocessing kernel for one GPU architecture, e.g. "sm_87" (Orin) or "sm_90" (H100)."""
    return _build(f"preprocess-{arch}", ".cubin", ["-cubin", f"-arch={arch}", "preprocess.cu"], DEVICE_FLAGS)


def build_harness() -> Path:
    """The host harness shared library (no GPU needed)."""
    return _build("harness-host", ".so", ["-shared", "harness.cu"], HOST_FLAGS)
