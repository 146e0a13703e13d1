#!/usr/bin/env python3
"""Blender import time of TRELLIS results: mesh (attribute API) and mesh + PBR material.

Runs in the bpy module (``.venv/bin/python benchmarks/blender_import.py``; for Blender 4.2 prefix
``PYTHONPATH=.venv/blender42``). The extension is staged by build.py into a temp folder and its
``mesh_import`` module used exactly as the add-on does. Prints a Markdown table for BENCHMARKS.md.

Cases per size (100k and 1M triangles, a wavy grid):
* mesh: ``build_mesh`` (positions, corner verts, loop starts, edges, smooth shading);
* + vertex PBR: ``import_result`` with 6 per-vertex channels → colour/float attributes + material;
* + textures: ``import_result`` with UVs and 2048² base-colour + metallic/roughness images (PNG-encoded
  with zlib level 1 and packed; texture-like content — pure noise would add ≈ 1.2 s per image).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    xs = np.linspace(-0.5, 0.5, n + 1, dtype=np.float32)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), 0.05 * np.sin(8 * x.ravel()) * np.cos(8 * y.ravel())], 1).astype(np.float32)
    i = np.arange(n)
    a = (i[:, None] * (n + 1) + i[None, :]).ravel()
    b, c, d = a + 1, a + n + 1, a + n + 2
    return v, np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)]).astype(np.int32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="224,708", help="grid sizes n (2n² triangles)")
    args = ap.parse_args()

    import bpy

    sys.path.insert(0, str(ROOT))
    import build

    stage_root = Path(tempfile.mkdtemp(prefix="trellis_bench_"))
    build.stage(stage_root)
    sys.path.insert(0, str(stage_root))
    from trellis2 import mesh_import  # the staged extension package

    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        v, f = grid(n)
        rng = np.random.default_rng(0)
        attrs = rng.random((len(v), 6), dtype=np.float32)
        attrs[:, 5] = 1.0
        uv = (v[:, :2] + 0.5).astype(np.float32)
        # texture-like content (smooth colour fields + mild noise); pure noise is the PNG worst case
        yy, xx = np.mgrid[:2048, :2048].astype(np.float32) / 2048
        base = np.stack([np.sin(6 * xx) * 0.5 + 0.5, np.cos(5 * yy) * 0.5 + 0.5, xx * yy, np.ones_like(xx)], -1)
        tex = np.clip(base * 255 + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        tex[..., 3] = 255
        mr = tex[..., :3].copy()
        cases = {
            "mesh": lambda: mesh_import.build_mesh("b", v, f),
            "mesh + vertex PBR material": lambda: mesh_import.import_result(
                bpy.context, {"vertices": v, "faces": f, "attrs": attrs}, name="b", material_mode="VERTEX"),
            "mesh + 2048² textures (packed)": lambda: mesh_import.import_result(
                bpy.context, {"vertices": v, "faces": f, "uv": uv, "base_color_texture": tex,
                              "metallic_roughness_texture": mr}, name="b", material_mode="TEXTURES"),
        }
        for name, fn in cases.items():
            times = []
            for _ in range(args.repeats):
                bpy.ops.wm.read_homefile(use_empty=True, use_factory_startup=True)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rows.append((len(f), len(v), name, statistics.median(times), min(times)))
            print(f"{len(f):>9,} tris  {name:<32} median {statistics.median(times):.3f} s  min {min(times):.3f} s",
                  flush=True)

    print(f"\nBlender {bpy.app.version_string} (bpy module), numpy {np.__version__}, "
          f"median of {args.repeats}:\n")
    print("| triangles | vertices | case | median s | min s |")
    print("|---:|---:|---|---:|---:|")
    for tris, verts, name, med, mn in rows:
        print(f"| {tris:,} | {verts:,} | {name} | {med:.2f} | {mn:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
