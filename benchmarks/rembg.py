#!/usr/bin/env python3
"""Background removal at 1024²: the released BiRefNet size (Swin-L, 220 M parameters) with the golden
recipe weights (same architecture and FLOPs as ZhengPeng7/BiRefNet; no real weights here).

    python -m benchmarks.rembg [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--reps 3] [--tiny]

Rows: the network alone on the normalised 1024² tensor ("model"), the remover as the pipeline calls it
(PIL squash, normalise, model, sigmoid, truncation, BICUBIC back to the photo size: "remover"), and the
whole ``preprocess`` stage a job runs (remover + alpha crop + premultiply: "preprocess stage"), on the
774×640 golden photo. ``--tiny`` uses the tiny test remover instead. Prints the best of ``--reps`` runs
after one warm-up, and peak RSS / peak VRAM. GPU target (issue #12): ≤ 60 ms fp16 on an H100.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.pipelines.preprocess import preprocess_with_info  # noqa: E402
from backend.pipelines.rembg import BiRefNetRemover  # noqa: E402
from benchmarks.timing import bench  # noqa: E402

SHARED = Path(os.environ.get("TRELLIS_SHARED", ROOT.parent / "shared"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _model(tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if tiny:
        from backend.models.birefnet import load_birefnet, write_tiny_birefnet

        folder = Path(tempfile.mkdtemp(prefix="rembg_bench_"))
        write_tiny_birefnet(folder)
        return load_birefnet(folder, device=device, dtype=dtype)
    from backend.golden.birefnet_cases import build_recipe_model

    return build_recipe_model(SHARED / "golden_birefnet" / "manifest_swin_v1_l.json").to(device, dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp32 on CPU, fp16 on GPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tiny test remover instead of the Swin-L size")
    args = ap.parse_args(argv)
    from PIL import Image

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "fp16")]
    model = _model(args.tiny, device, dtype)
    remover = BiRefNetRemover(model, device)
    photo = Image.open(SHARED / "golden_birefnet" / "case_C_input.png")
    photo.load()
    x = remover.model_input(remover.resized_rgb(photo)).to(device, dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"BiRefNet {'tiny' if args.tiny else 'Swin-L'} ({n / 1e6:.1f} M params), {device} {dtype}, "
          f"threads {torch.get_num_threads()}, photo {photo.size[0]}×{photo.size[1]}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # recipe weights give masks of 60..192 (no "object" above alpha 0.8): the stage row lifts the mask by
    # 80 levels (one PIL point op) so the crop + premultiply that follow run as in a real job
    def lifted(im: Image.Image) -> Image.Image:
        return remover(im).point(lambda p: min(255, p + 80))

    with torch.no_grad():
        rows = [("model (1024² tensor)", bench(lambda: model(x), args.reps, device)),
                ("remover (photo → mask)", bench(lambda: remover(photo), args.reps, device)),
                ("preprocess stage", bench(lambda: preprocess_with_info(photo, lifted), args.reps, device))]
    for name, s in rows:
        print(f"  {name:24s} {s * 1000:9.1f} ms")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
          + (f", peak VRAM {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
