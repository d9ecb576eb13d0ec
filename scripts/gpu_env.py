"""The first lines of the GPU check: versions, CUDA, and whether loramux can run on these packages.

Exits non-zero, saying why, when a package loramux needs is missing or outside the range that
pyproject.toml asks for (transformers above all: loramux registers its own attention function
through transformers' attention interface, which must match). Run by scripts/gpu_check.sh.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    print(f"python {platform.python_version()} ({sys.executable})")
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, gpu: {gpu}")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bad = []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{req.name}: missing (carry it: scripts/gpu_wheels.py)")
            continue
        ok = req.name == "torch" or req.specifier.contains(have, prereleases=True)  # torch: the image's own build
        print(f"{req.name} {have}{'' if ok else f'  OUTSIDE {req.specifier}'}")
        if not ok:
            bad.append(f"{req.name} {have} is outside {req.specifier}")
    try:
        import loramux.api.server  # noqa: F401  - every module the server imports at start
    except Exception as e:  # noqa: BLE001 - reported, then the check stops
        bad.append(f"importing the server failed: {type(e).__name__}: {e}")
    for line in bad:
        print(f"PROBLEM: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
