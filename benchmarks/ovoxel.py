"""O-Voxel codec benchmark: encode / decode time, voxel count and peak memory.

    .venv/bin/python benchmarks/ovoxel.py                 # sphere 100k tris at R=256/512/1024 + assets at 256/512
    .venv/bin/python benchmarks/ovoxel.py --sphere-only --resolutions 1024
    .venv/bin/python benchmarks/ovoxel.py --assets spot barrel --resolutions 256

Every case runs in a fresh subprocess (so peak RSS is per case): the mesh is loaded and normalised,
one warm-up encode at R=64 is done, then encode (geometry; official weights 1.0/0.2/0.01) and decode
(clean mode: working split, unused vertices removed, outward orientation) are timed (wall and process
CPU time, which is what matters on a machine shared with other jobs), plus decode in the official mode
(= flexible_dual_grid_to_mesh); then ``trellis2 ovoxel encode`` (the CLI, as a process: mesh file
load, normalisation, geometry, PBR voxelisation, .npz write) is timed end to end on the same mesh (the
sphere written to a .glb first) and shown next to the in-process geometry encode. Peak memory = max RSS of the case process minus its RSS before the
encode (i.e. what the codec itself needed). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRELLIS_SHARED", REPO.parent / "shared"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.assets import ASSETS  # noqa: E402  (the one asset table, shared with the tests)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cli_encode(name: str, R: int, v, f) -> tuple[float, str]:
    """Wall time of ``trellis2 ovoxel encode`` as a process on the case's mesh file, and its summary line."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if name == "sphere":
            from backend.mesh_io import save_mesh

            src = os.path.join(tmp, "sphere.glb")
            save_mesh(src, v, f)
        else:
            src = str(SHARED / "assets" / "meshes" / ASSETS[name])
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "backend", "ovoxel", "encode", src, "-r", str(R), "-o",
                            os.path.join(tmp, "out.npz")], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
    if p.returncode != 0:
        return float("nan"), p.stderr.strip()[-200:]
    return wall, p.stdout.strip().splitlines()[-1].split("(", 1)[-1].split(")")[0]


def run_case(name: str, R: int) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from backend.ovoxel import decode_ovoxel, encode_shape, normalize_vertices

    if name == "sphere":
        from backend.ovoxel.shapes import uv_sphere

        v, f = uv_sphere()
    else:
        from backend.mesh_io import load_mesh

        m = load_mesh(SHARED / "assets" / "meshes" / ASSETS[name])
        v, _, _ = normalize_vertices(m.vertices)
        f = m.faces
    encode_shape(v, f, 64)  # warm-up (imports, allocator)
    base = _rss_mb()
    t, c = time.perf_counter(), time.process_time()
    ov = encode_shape(v, f, R)
    enc_wall, enc_cpu = time.perf_counter() - t, time.process_time() - c
    peak_enc = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    t, c = time.perf_counter(), time.process_time()
    dv, df = decode_ovoxel(ov)
    dec_wall, dec_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    decode_ovoxel(ov, official=True)
    off_wall, off_cpu = time.perf_counter() - t, time.process_time() - c
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    cli_wall, cli_out = _cli_encode(name, R, v, f)
    st = ov.meta["encode_stats"]
    return {"case": name, "R": R, "tris": int(np.asarray(f).shape[0]), "voxels": ov.num_voxels,
            "faces_out": int(df.shape[0]), "enc_wall": enc_wall, "enc_cpu": enc_cpu, "dec_wall": dec_wall,
            "dec_cpu": dec_cpu, "dec_off_wall": off_wall, "dec_off_cpu": off_cpu,
            "peak_enc_mb": peak_enc, "peak_mb": peak, "constrained": st.get("constrained", 0),
            "cli_wall": cli_wall, "cli_out": cli_out,
            "stages": {k: round(x, 3) for k, x in st.get("timing", {}).items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--asset-resolutions", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--assets", nargs="*", default=list(ASSETS))
    ap.add_argument("--sphere-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (the fastest is reported)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("-r", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.r)))
        return 0
    cases = [("sphere", R) for R in args.resolutions]
    if not args.sphere_only:
        cases += [(a, R) for R in args.asset_resolutions for a in args.assets]
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"# O-Voxel codec benchmark — {cpu}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print("| case | R | tris | voxels | out faces | encode wall / cpu s | CLI encode wall s (× in-process) | "
          "decode wall / cpu s | official decode wall / cpu s | peak MB (encode / all) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, R in cases:
        best = None
        for _ in range(args.repeat):
            p = subprocess.run([sys.executable, __file__, "--case", name, "-r", str(R)], capture_output=True,
                               text=True, cwd=REPO)
            if p.returncode != 0:
                print(f"| {name} | {R} | failed: {p.stderr.strip().splitlines()[-1] if p.stderr else '?'} |")
                break
            r = json.loads(p.stdout.strip().splitlines()[-1])
            if best is None or r["enc_wall"] + r["dec_wall"] < best["enc_wall"] + best["dec_wall"]:
                best = r
        if best is None:
            continue
        results.append(best)
        r = best
        print(f"| {name} | {R} | {r['tris']:,} | {r['voxels']:,} | {r['faces_out']:,} | "
              f"{r['enc_wall']:.2f} / {r['enc_cpu']:.2f} | {r['cli_wall']:.2f} ({r['cli_wall'] / r['enc_wall']:.1f}×) | "
              f"{r['dec_wall']:.2f} / {r['dec_cpu']:.2f} | "
              f"{r['dec_off_wall']:.2f} / {r['dec_off_cpu']:.2f} | {r['peak_enc_mb']:.0f} / {r['peak_mb']:.0f} |",
              flush=True)
    for r in results:
        print(f"CLI stages {r['case']} R={r['R']}: {r['cli_out']}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
