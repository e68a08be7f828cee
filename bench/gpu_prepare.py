"""Prepare what the GPU check needs on a GPU machine that cannot download anything (issue 16).

    .venv/bin/python bench/gpu_prepare.py          # here, after `make setup`; writes .gpu/ (git-ignored)

The device machines run their own image's ``python3`` (PyTorch with CUDA, transformers, accelerate, …; no
biaslab, no ``gguf``, no default model) and receive the repository plus named ignored paths, 64 MiB in all. The
default model's GGUF (94 MB) does not fit, so this copies its *shape* — config, tokenizer, chat template; no
weights — into ``.gpu/smollm2-shape``, from which ``bench/gpu_check.py --random-from`` builds a random-weight
model there (``bench/gpu_models.py``). It prints the size that would travel. The device call is then
(docs/SCALE.md, bench/README.md)::

    run(command="bash bench/gpu_check.sh --out $OUT/gpu_check.json", carry=[".gpu"], timeout_s=540)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_models import SHAPE_FILES  # noqa: E402

LIMIT = 64 << 20


def main() -> int:
    from biaslab.models.loading import embedded_model_dir

    src = embedded_model_dir("smollm2-135m-instruct")
    dst = ROOT / ".gpu" / "smollm2-shape"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in SHAPE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    (dst / "README.txt").write_text("SmolLM2-135M-Instruct's config, tokenizer and chat template (Apache-2.0), no "
                                    "weights: bench/gpu_check.py --random-from builds a random-weight model of this "
                                    "shape on the GPU machine. Written by bench/gpu_prepare.py.\n")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    size = sum((ROOT / p).stat().st_size for p in tracked.decode().split("\0") if p and (ROOT / p).is_file())
    extra = sum(f.stat().st_size for f in (ROOT / ".gpu").rglob("*") if f.is_file())
    total = size + extra
    print(f"{dst}: {extra / 2**20:.1f} MiB; the repository's tracked files {size / 2**20:.1f} MiB; "
          f"{total / 2**20:.1f} MiB would travel (limit 64 MiB)")
    if total > LIMIT:
        print("error: over the device machines' 64 MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import argparse   # takes no options: --help prints what it does and writes; anything else is refused, not run

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    raise SystemExit(main())
