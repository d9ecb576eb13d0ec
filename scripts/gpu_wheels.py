"""Fill a folder with the wheels the GPU machine lacks, so scripts/gpu_check.sh runs there offline.

The lent GPU machine reaches no network. Its image already holds torch, transformers, peft,
safetensors, tokenizers, numpy, prometheus-client, triton, pytest and pytest-timeout (see
`IMAGE` below). Everything else that `loramux` imports at run time must travel with the working
tree as wheels, installed there with `pip install --no-index --no-deps --target ...`.

What is carried is derived, not listed: every distribution that loramux's runtime requirements
pull in (walked through the installed metadata of this machine's `.venv`), minus what the image
has, plus `grpcio` and `protobuf` always, since the committed gRPC stubs check that the runtime is
at least the version that generated them. Each is downloaded at the version installed here, so the
GPU run uses the same versions the CPU tests pass with.

    .venv/bin/python scripts/gpu_wheels.py            # -> .whl/, for the GPU machine's Python 3.12
    .venv/bin/python scripts/gpu_wheels.py --python-version 3.11 --dest /tmp/whl311   # the offline dry run here
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The GPU machine's image (its package list, as last read); names normalised as in PEP 503.
IMAGE = {
    "accelerate", "aiohttp", "annotated-doc", "anyio", "attrs", "certifi", "charset-normalizer", "click",
    "filelock", "fsspec", "h11", "hf-xet", "httpcore", "httpx", "huggingface-hub", "idna", "jinja2",
    "markupsafe", "mpmath", "networkx", "numpy", "packaging", "peft", "prometheus-client", "psutil",
    "pytest", "pytest-timeout", "pyyaml", "regex", "requests", "safetensors", "setuptools", "sympy",
    "tokenizers", "torch", "tqdm", "transformers", "triton", "typer", "typing-extensions", "urllib3",
    "uvloop", "shellingham", "rich", "markdown-it-py", "mdurl", "pygments", "iniconfig", "pluggy",
}  # fmt: skip
# Always carried: the generated stubs refuse a runtime older than their generator.
ALWAYS = {"grpcio", "protobuf"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]  # fmt: skip
LIMIT_BYTES = 48 * 2**20  # the working tree that travels is capped at 64 MiB in all; leave room for the repo


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "loramux") -> dict[str, str]:
    """{normalised name: installed version} of `root` and everything its runtime requirements need."""
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        name = norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here (a marker for another platform)
        seen[name] = dist.version
        if name in IMAGE and name not in ALWAYS:
            continue  # the image's own packages come with their own requirements there
        for req in dist.requires or []:
            if "extra ==" in req:
                continue  # only runtime requirements: extras (test, plots) are not imported by the server
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if m and not _marker_false(req):
                todo.append(m.group(1))
    seen.pop(root, None)
    return seen


def _marker_false(req: str) -> bool:
    if ";" not in req:
        return False
    try:
        from packaging.requirements import Requirement

        r = Requirement(req)
        return r.marker is not None and not r.marker.evaluate({"python_version": "3.12", "sys_platform": "linux"})
    except Exception:  # noqa: BLE001 - no packaging: keep the requirement
        return False


def to_carry(closure: dict[str, str]) -> dict[str, str]:
    return {n: v for n, v in sorted(closure.items()) if n in ALWAYS or n not in IMAGE}


def download(pkgs: dict[str, str], dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()  # one version of each: two would stop the whole install there
    for name, version in pkgs.items():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", python_version, "--implementation", "cp", "-d", str(dest), f"{name}=={version}"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=".whl", help="folder for the wheels (git-ignored; named in the run's carry)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--list", action="store_true", help="print what would be carried, download nothing")
    a = ap.parse_args()
    pkgs = to_carry(runtime_closure())
    for n, v in pkgs.items():
        print(f"carry {n}=={v}")
    if a.list:
        return 0
    dest = Path(a.dest)
    download(pkgs, dest, a.python_version)
    total = sum(f.stat().st_size for f in dest.glob("*.whl"))
    print(f"{len(list(dest.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {dest}")
    if total > LIMIT_BYTES:
        print(f"too large: over {LIMIT_BYTES // 2**20} MiB would not travel with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
