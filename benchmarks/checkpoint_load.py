"""Checkpoint loading at the official size: ``python benchmarks/checkpoint_load.py [--stem STEM]``.

Writes a zero-filled bf16 checkpoint with the exact keys/shapes of an official flow (default
``slat_flow_img2shape_dit_1_3B_512_bf16``, 2.6 GB) into a temp folder, then loads it in a fresh
subprocess with :func:`backend.models.from_pretrained` (CPU → fp32, 5.2 GB of parameters) and prints
the wall time and the peak resident memory. The peak counts the parameters plus the file pages the
memory map touched; a loader that first materialised the whole state dict would add another full copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {repo!r})
from backend.models import from_pretrained

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 2**20  # kB -> GiB
    return out

base = status()
t0 = time.perf_counter()
m = from_pretrained({stem!r})
dt = time.perf_counter() - t0
s = status()
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(f"loaded {{sum(p.numel() for p in m.parameters()):,}} params ({{n / 2**30:.2f}} GiB fp32) in {{dt:.1f}} s; "
      f"peak RSS {{s['VmHWM']:.2f}} GiB (before load {{base['VmRSS']:.2f}}); after load: anonymous "
      f"{{s['RssAnon']:.2f}} GiB, file-backed (mmap, reclaimable) {{s['RssFile']:.2f}} GiB")
"""

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stem", default="slat_flow_img2shape_dit_1_3B_512_bf16")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    a = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    summary = json.loads((Path(a.shared) / "official_state_dict" / "_summary.json").read_text())[a.stem]
    manifest = json.loads((Path(a.shared) / "official_state_dict" / f"{a.stem}.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        stem = Path(tmp) / a.stem
        (Path(tmp) / f"{a.stem}.json").write_text(json.dumps({"name": summary["cls"], "args": summary["args"]}))
        t0 = time.perf_counter()
        save_file({k: torch.zeros(shape, dtype=getattr(torch, dt)) for k, (shape, dt) in manifest.items()},
                  str(stem) + ".safetensors")
        size = Path(str(stem) + ".safetensors").stat().st_size
        print(f"wrote {size / 2**30:.2f} GiB test file in {time.perf_counter() - t0:.1f} s")
        subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), stem=str(stem))], check=True)


if __name__ == "__main__":
    main()
