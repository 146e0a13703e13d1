"""GLB export (the last step of ``trellis2 generate -o out.glb`` and of batch items): ``write_glb`` of a
decimated result (500k faces, per-corner UVs, 2048² base colour + metallic-roughness) and ``save_mesh`` of a
vertex-colour O-Voxel decode, through the one writer ``backend/glb.py``. ``--trimesh`` also times trimesh's
exporter on the same textured mesh (what ``write_glb`` used before).

    .venv/bin/python benchmarks/glb_export.py [--faces 500000] [--texture 2048] [--reps 3] [--trimesh]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.mesh_io import save_mesh  # noqa: E402
from backend.pipelines.export import split_corner_uvs, write_glb  # noqa: E402


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=500_000)
    ap.add_argument("--texture", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trimesh", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n_v = args.faces // 2
    v = rng.normal(size=(n_v, 3)).astype(np.float32)
    f = rng.integers(0, n_v, size=(args.faces, 3)).astype(np.int32)
    uv = rng.uniform(size=(args.faces, 3, 2)).astype(np.float32)
    # smooth textures (a baked texture compresses like this, not like noise)
    yy, xx = np.mgrid[0:args.texture, 0:args.texture].astype(np.float32) / args.texture
    base = np.stack([xx * 255, yy * 255, (xx + yy) * 127, np.full_like(xx, 255)], -1).astype(np.uint8)
    mr = np.stack([np.zeros_like(xx), yy * 255, xx * 255], -1).astype(np.uint8)
    col = rng.uniform(size=(n_v, 3))
    with tempfile.TemporaryDirectory() as tmp:
        out = {"faces": args.faces, "texture": args.texture}
        out["write_glb_s"] = round(_best(lambda: write_glb(Path(tmp) / "a.glb", v, f, uv, base, mr), args.reps), 3)
        out["write_glb_mb"] = round((Path(tmp) / "a.glb").stat().st_size / 2**20, 1)
        out["save_mesh_glb_s"] = round(_best(lambda: save_mesh(Path(tmp) / "b.glb", v, f, col), args.reps), 3)
        if args.trimesh:
            import trimesh
            from PIL import Image

            def via_trimesh() -> None:
                vmap, f2, uvv = split_corner_uvs(f, uv)
                vv = v[vmap]
                mat = trimesh.visual.material.PBRMaterial(
                    baseColorTexture=Image.fromarray(base, "RGBA"),
                    metallicRoughnessTexture=Image.fromarray(mr, "RGB"), metallicFactor=1.0, roughnessFactor=1.0)
                mesh = trimesh.Trimesh(np.stack([vv[:, 0], vv[:, 2], -vv[:, 1]], 1), f2, process=False,
                                       visual=trimesh.visual.TextureVisuals(uv=uvv, material=mat))
                (Path(tmp) / "c.glb").write_bytes(trimesh.Scene({"m": mesh}).export(file_type="glb"))

            out["trimesh_s"] = round(_best(via_trimesh, args.reps), 3)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
