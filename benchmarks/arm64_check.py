"""python -m benchmarks.arm64_check: the deployment path on arm64 (a Jetson's CPU side), checked on an x86-64 host.

It builds (or reuses) a Debian arm64 root with debootstrap, runs it through qemu-user-static (binfmt_misc), copies
this checkout and a model directory exported here into it as a workstation hands them to a device, installs the
runtime only there (`bash setup.sh --runtime-only`: no PyTorch, no export tools), classifies a few images there with
`--precision fp32 --backend cpu`, classifies the same images here, and compares every probability (image and
field) and label: labels identical, probabilities within the FP32 table's tolerance (runtime/model/precisions.py:
atol + rtol * |host's|). It then reports the versions used on both sides and what the runtime says there about the
optional extras it lacks.

Not part of the test suite: emulated inference is about 70x slower than native (some 500 s per 700x460 image on a
2-core VM), so it runs two images by default. Needs root (debootstrap, chroot, mounts). Exit status: 0 every result
agrees, 1 a result differs or a step failed, 77 skipped (the reason is printed: not root, no debootstrap, no
qemu-aarch64 binfmt handler).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from benchmarks import write_json
from runtime.model.model_dir import MANIFEST_NAME, REPORT_NAME, ModelDir
from runtime.model.paths import REPO, default_model_dir, sample_images
from runtime.model.precisions import PRECISIONS

SKIP = 77
IMAGES = ("SOB_M_DC-14-10926-100-003.png", "SOB_B_A-14-22549AB-100-006.png")  # one Malignant, one Benign
PROJECT = "/opt/breakhis-edge"  # where the checkout lies inside the root
BINFMT = Path("/proc/sys/fs/binfmt_misc")
LIBS = ("numpy", "onnxruntime", "opencv-python-headless", "simplejpeg", "imagecodecs", "tifffile", "pillow", "tqdm")
# What the runtime says on the device where an optional extra is missing: each probe prints the runtime's own message.
EXTRAS_PROBE = """
import importlib.util
from pathlib import Path
probes = {
    "torch (must be absent)": lambda: print("installed" if importlib.util.find_spec("torch") else "not installed"),
}
def openvino():
    from runtime.backends.openvino import native
    ok, why = native("bf16")
    print("native BF16" if ok else why)
def ray():
    from runtime.cohorts.pools import import_ray
    import_ray()
    print("installed")
def dicom():
    from runtime.io.slide_source import DicomSource
    DicomSource(Path("/nonexistent-dicom-folder"))
def pytriton():
    from runtime.apps.triton_server import pytriton_or_move
    pytriton_or_move()
    print("installed")
def serve():
    import contextlib, io, runpy
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_module("runtime.serve")
            print("installed")
        except SystemExit:
            print(err.getvalue().strip())
probes.update(openvino=openvino, ray=ray, dicom=dicom, pytriton=pytriton, serve=serve)
for name, probe in probes.items():
    try:
        print(f"  {name}: ", end="", flush=True)
        probe()
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
"""
VERSIONS = f"""
import platform, sys
from importlib import metadata
print(f"  machine {{platform.machine()}}, Python {{platform.python_version()}}, {{platform.libc_ver()[0]}} "
      f"{{platform.libc_ver()[1]}}")
for lib in {LIBS!r}:
    try:
        print(f"  {{lib}} {{metadata.version(lib)}}")
    except metadata.PackageNotFoundError:
        print(f"  {{lib}} not installed")
import onnxruntime
print(f"  onnxruntime providers: {{', '.join(onnxruntime.get_available_providers())}}")
"""


class Skip(Exception):
    """The check cannot run on this machine; the message says why and what would make it run."""


def say(msg: str) -> None:
    print(msg, flush=True)


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (its first non-security `deb.debian.org`-style entry), else
    deb.debian.org."""
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = f.read_text()
        except OSError:
            continue
        for url in re.findall(r"(?:^URIs:|^deb(?:\s+\[[^\]]*\])?)\s+(\S+)", text, re.MULTILINE):
            if url.rstrip("/").endswith("/debian"):
                return url
    return "http://deb.debian.org/debian"


def binfmt_ready(root: Path) -> str:
    """'' where aarch64 binaries run here (natively, or through a qemu-aarch64 binfmt handler, enabled when it is
    installed but off); else why not. A handler without the F flag gets its interpreter copied into the root."""
    if platform.machine() == "aarch64":
        return ""
    handler = BINFMT / "qemu-aarch64"
    if not handler.is_file():
        if not (BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=False, capture_output=True)
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False, capture_output=True)
    if not handler.is_file():
        return ("no qemu-aarch64 binfmt handler (apt-get install qemu-user-static binfmt-support; then mount -t "
                "binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc and update-binfmts --enable qemu-aarch64)")
    text = handler.read_text()
    if not text.startswith("enabled"):
        return f"the qemu-aarch64 binfmt handler is disabled ({handler}: update-binfmts --enable qemu-aarch64)"
    interpreter = re.search(r"^interpreter (\S+)", text, re.MULTILINE)
    flags = re.search(r"^flags: (\S*)", text, re.MULTILINE)
    if interpreter and "F" not in (flags.group(1) if flags else ""):
        inside = root / interpreter.group(1).lstrip("/")
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(interpreter.group(1), inside)
    return ""


def ensure_root(root: Path, mirror: str, suite: str) -> None:
    """A Debian arm64 root with Python and venv at ``root``: reused where it has them, else made by debootstrap."""
    if (root / "debootstrap").exists():  # debootstrap removes its folder when it has finished
        raise RuntimeError(f"{root} is an unfinished root (its debootstrap stopped): remove it and run again")
    if (root / "usr/bin/python3").exists():
        say(f"arm64 root: reusing {root}")
        return
    if not shutil.which("debootstrap"):
        raise Skip("debootstrap is not installed (apt-get install debootstrap)")
    say(f"arm64 root: debootstrap {suite} from {mirror} into {root} (several minutes under emulation)")
    subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    suite, str(root), mirror], check=True)


def pip_env() -> dict[str, str]:
    """How pip reaches the package index inside the root, as it does here: this machine's CA bundle (copied into the
    root) and its index settings where they are URLs the root can reach (not local folders)."""
    env = {"PIP_CERT": "/etc/ssl/certs/host-ca.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_DEFAULT_TIMEOUT": os.environ.get("PIP_DEFAULT_TIMEOUT", "180")}
    env.update({k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")})
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        urls = [u for u in os.environ.get(key, "").split() if key == "PIP_TRUSTED_HOST" or u.startswith("http")]
        if urls:
            env[key] = " ".join(urls)
    return env


def host_ca() -> Path:
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(name) and Path(os.environ[name]).is_file():
            return Path(os.environ[name])
    return Path("/etc/ssl/certs/ca-certificates.crt")


def copy_project(root: Path, model: ModelDir, images: list[Path]) -> tuple[str, list[str]]:
    """This checkout's files (as git lists them, no links, no models) and the model directory as a workstation hands
    it over (manifest, report, the files of its variants; no checkpoint, no engines) into the root; the venv of an
    earlier run is kept. Returns (the model's path, the images' paths) inside the root."""
    dest = root / PROJECT.lstrip("/")
    if dest.is_dir():
        for p in dest.iterdir():
            if p.name != ".venv":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_symlink() or not src.is_file() or name.startswith("models/"):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
    target = dest / "models" / model.path.name
    target.mkdir(parents=True)
    names = [MANIFEST_NAME, REPORT_NAME, *sorted({v.file for v in model.manifest.variants.values()})]
    for name in names:
        if (model.path / name).is_file():
            shutil.copy2(model.path / name, target / name)
    image_dir = root / "opt/images"
    shutil.rmtree(image_dir, ignore_errors=True)
    image_dir.mkdir(parents=True)
    for img in images:
        shutil.copy2(img, image_dir / img.name)
    return f"models/{model.path.name}", [f"/opt/images/{img.name}" for img in images]


class Mounts:
    """/sys and /dev inside the root while the check runs, and the host's CA bundle and resolver. Not /proc: under
    qemu-user (Debian 12's 7.2) the root would read the host's x86 /proc/cpuinfo, and ONNX Runtime's cpuinfo library
    crashes parsing it as an ARM CPU's (`import onnxruntime` segfaults); without it ONNX Runtime warns that cpuinfo
    found no CPU information, and runs. A real arm64 machine has its own /proc."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: list[Path] = []

    def __enter__(self) -> Self:
        shutil.copy2(host_ca(), self.root / "etc/ssl/certs/host-ca.crt")
        shutil.copy2("/etc/resolv.conf", self.root / "etc/resolv.conf")
        for args, where in ((["-t", "sysfs", "sys"], "sys"), (["--bind", "/dev"], "dev")):
            target = self.root / where
            if subprocess.run(["mountpoint", "-q", str(target)], check=False).returncode != 0:
                subprocess.run(["mount", *args, str(target)], check=True)
                self.done.append(target)
        return self

    def __exit__(self, *exc: object) -> None:
        for target in reversed(self.done):
            subprocess.run(["umount", "-l", str(target)], check=False)


def in_root(root: Path, script: str, capture: bool = False) -> tuple[float, str]:
    """Run a bash script inside the root, in the project's folder, with a clean environment; (seconds, stdout)."""
    env = {"HOME": "/root", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHON": "python3", **pip_env()}
    start = time.perf_counter()
    proc = subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           "/bin/bash", "-c", f"cd {PROJECT} && {script}"],
                          stdout=subprocess.PIPE if capture else None, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"inside the arm64 root, `{script}` failed (exit {proc.returncode})")
    return seconds, proc.stdout or ""


def classify_args(model: str, images: list[str]) -> list[str]:
    return ["-m", "runtime.classify", "--model", model, "--precision", "fp32", "--backend", "cpu", "--json",
            "--no-progress", *images]


def compare(host: list[dict[str, Any]], device: list[dict[str, Any]]) -> tuple[list[str], float]:
    """Lines saying each image's and field's result on both sides, and the worst |d p| / (atol + rtol |p|) over
    all (above 1: outside the tolerance). A label that differs or an error on either side is a failure line."""
    tol = PRECISIONS["fp32"].tolerance
    assert tol.probability is not None
    lines, worst = [], 0.0
    if len(host) != len(device):
        return [f"FAIL: {len(host)} results here, {len(device)} on arm64"], float("inf")
    for h, d in zip(host, device):
        name = Path(h["path"]).name
        if h.get("error") or d.get("error"):
            lines.append(f"FAIL {name}: error here {h.get('error')!r}, on arm64 {d.get('error')!r}")
            worst = float("inf")
            continue
        pairs = [(name, h, d)] + [(f"{name} field ({fh['row']},{fh['col']})", fh, fd)
                                  for fh, fd in zip(h["fields"], d["fields"], strict=True)]
        for what, a, b in pairs:
            ratio = abs(a["probability"] - b["probability"]) / (tol.probability + tol.rtol * abs(a["probability"]))
            ok = a["label"] == b["label"] and ratio <= 1.0
            worst = max(worst, ratio if a["label"] == b["label"] else float("inf"))
            lines.append(f"{'ok  ' if ok else 'FAIL'} {what}: x86-64 {a['label']} {a['probability']!r}, arm64 "
                         f"{b['label']} {b['probability']!r}, |d p| {abs(a['probability'] - b['probability']):.2e} "
                         f"= {ratio:.3f} of the bound")
    return lines, worst


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.arm64_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", type=Path, help=f"images to classify (default: {', '.join(IMAGES)} from "
                    "the shared samples)")
    ap.add_argument("--root", type=Path, default=REPO.parent / "arm64-root",
                    help="the arm64 root, made where missing (default: arm64-root beside the repository)")
    ap.add_argument("--model", type=Path, default=None, help="a model directory exported here (default: the "
                    "runtime's default model)")
    ap.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: the one apt uses here)")
    ap.add_argument("--suite", default="bookworm", help="Debian release of the root (default: bookworm)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    images = args.images or [sample_images() / name for name in IMAGES]
    for img in images:
        if not img.is_file():
            ap.error(f"{img}: not found")
    model = ModelDir.open(args.model or default_model_dir())
    if "fp32" not in model.manifest.variants:
        ap.error(f"{model.path}: no fp32 variant")
    model.file(model.variant("fp32").file)  # refuse a damaged export before the long part
    root = args.root.resolve()
    try:
        if os.geteuid() != 0:
            raise Skip("needs root (debootstrap, chroot and mounts)")
        if not (root / "usr/bin/python3").exists() and not shutil.which("debootstrap"):
            raise Skip("debootstrap is not installed (apt-get install debootstrap)")
        root.mkdir(parents=True, exist_ok=True)
        why = binfmt_ready(root)
        if why:
            raise Skip(why)
        ensure_root(root, args.mirror or debian_mirror(), args.suite)
    except Skip as e:
        say(f"skipped: {e}")
        return SKIP
    say(f"host: {platform.machine()}, {platform.node()}; model {model.path} ({model.manifest.name}); "
        f"images: {', '.join(img.name for img in images)}")
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
                              "model": model.manifest.name, "images": [img.name for img in images]}
    rel_model, rel_images = copy_project(root, model, images)
    with Mounts(root):
        say("arm64: bash setup.sh --runtime-only")
        result["install_s"], _ = in_root(root, "bash setup.sh --runtime-only")
        say(f"arm64: runtime-only install took {result['install_s']:.0f} s; versions and optional extras there:")
        _, versions = in_root(root, ".venv/bin/python - <<'EOF'\n" + VERSIONS + EXTRAS_PROBE + "EOF", capture=True)
        say(versions.rstrip())
        if "torch (must be absent): not installed" not in versions:
            say("FAIL: PyTorch is importable in the runtime-only install")
            return 1
        say("arm64: classify (emulated: minutes per image)")
        result["arm64_classify_s"], out = in_root(root, " ".join([".venv/bin/python", *classify_args(rel_model,
                                                                                                       rel_images)]),
                                                  capture=True)
    device = json.loads(out)
    say(f"arm64: classified in {result['arm64_classify_s']:.0f} s; here (x86-64):")
    here = subprocess.run([sys.executable, "-c", VERSIONS], capture_output=True, text=True, check=True).stdout
    say(here.rstrip())
    start = time.perf_counter()
    host = json.loads(subprocess.run([sys.executable, *classify_args(str(model.path), [str(i) for i in images])],
                                     cwd=REPO, capture_output=True, text=True, check=True).stdout)
    result["host_classify_s"] = time.perf_counter() - start
    lines, worst = compare(host, device)
    say("\n".join(lines))
    result.update(arm64_versions=versions, host_versions=here, comparison=lines, worst_of_bound=worst,
                  passed=worst <= 1.0)
    tol = PRECISIONS["fp32"].tolerance
    say(f"{'PASS' if worst <= 1.0 else 'FAIL'}: labels {'identical' if worst != float('inf') else 'differ'}, worst "
        f"|d p| {worst:.3f} of the FP32 bound (atol {tol.probability:g} + rtol {tol.rtol:g} |p|); install "
        f"{result['install_s']:.0f} s, arm64 classify {result['arm64_classify_s']:.0f} s, x86-64 "
        f"{result['host_classify_s']:.1f} s")
    write_json(args.json, result)
    return 0 if worst <= 1.0 else 1


def run() -> int:
    try:
        return main()
    except (RuntimeError, subprocess.CalledProcessError, ValueError) as e:  # a step failed: said, not a traceback
        say(f"FAIL: {e}")
        if getattr(e, "stderr", None):
            say(e.stderr)  # type: ignore[union-attr]
        return 1


if __name__ == "__main__":
    sys.exit(run())
