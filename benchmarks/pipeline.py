"""Per-stage times and peak memory of the pipelines.

    python benchmarks/pipeline.py                       # tiny random checkpoints, CPU (written to a temp dir)
    python benchmarks/pipeline.py --model DIR --device cuda --types 512 1024_cascade

Prints one line per pipeline type: total wall time, voxels, faces, then each stage's seconds and
peak memory (CUDA: ``max_memory_allocated`` per stage; CPU: process peak RSS). The first run of
each type is a warm-up (model loading) and is reported separately.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _image() -> np.ndarray:
    h, w = 256, 200
    yy, xx = np.mgrid[0:h, 0:w]
    r = ((yy - h * 0.55) / (h * 0.35)) ** 2 + ((xx - w * 0.5) / (w * 0.3)) ** 2
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = xx * 255 // w, yy * 255 // h, 90
    img[..., 3] = (np.clip(1.5 - r, 0, 1) * 255).astype(np.uint8)
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="pipeline folder (default: tiny random checkpoints)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--types", nargs="+", default=["512", "1024", "1024_cascade", "1536_cascade"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--texture", action="store_true", help="also time the texture-only pipeline")
    args = ap.parse_args(argv)

    import torch

    from backend.pipelines import load_pipeline
    from backend.pipelines.tiny import write_tiny_pipeline

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        model = str(write_tiny_pipeline(Path(tmp.name) / "tiny"))
        print(f"tiny checkpoints written in {time.perf_counter() - t:.2f}s")
    pipe = load_pipeline(model, device=args.device, low_vram=args.low_vram, precision=args.precision)
    print(f"device {pipe.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    img = _image()
    for pt in args.types:
        for rep in range(args.repeat):
            t = time.perf_counter()
            res = pipe.generate(img, pt, seed=rep)
            wall = time.perf_counter() - t
            tag = "warm-up" if rep == 0 and args.repeat > 1 else "run"
            stages = "  ".join(f"{k}={v:.3f}s/{res.peak_memory.get(k, 0) / 2**20:.0f}MiB"
                               for k, v in res.timings.items())
            print(f"{pt:13s} {tag:7s} total {wall:6.2f}s  res {res.resolution}  voxels {res.num_voxels}  "
                  f"faces {len(res.faces)}\n    {stages}")
    if args.texture:
        import trimesh

        m = trimesh.creation.icosphere(subdivisions=3)
        for rep in range(args.repeat):
            t = time.perf_counter()
            tr = pipe.texture(np.asarray(m.vertices), np.asarray(m.faces), img, seed=rep, resolution=1024,
                              texture_size=512)
            print(f"texture       {'warm-up' if rep == 0 else 'run':7s} total {time.perf_counter() - t:6.2f}s  "
                  + "  ".join(f"{k}={v:.3f}s" for k, v in tr.timings.items()))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
