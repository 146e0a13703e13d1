"""Benchmark the kernels/ ops: Triton kernel vs pure-PyTorch reference vs spconv / the numpy codec.

Usage (from the repo root)::

    .venv/bin/python -m benchmarks.kernels                # CUDA if present, else CPU reference only
    .venv/bin/python -m benchmarks.kernels --device cpu --quick
    .venv/bin/python -m benchmarks.kernels --json out.json

Cases (GPU sizes are the issue-8 targets; CPU sizes are scaled down, the CPU only runs references):

* ``conv``: submanifold 3×3×3 conv forward on a sphere shell (surface-like, ~17/27 neighbours),
  cached neighbour map; GPU: 1M voxels × 256→256 channels fp16 (+ 64 ch and bf16); target: kernel
  ≥ spconv (``SubMConv3d``, implicit GEMM, cached indices; only if ``spconv`` imports — untested here).
* ``mesh``: O-Voxel → mesh (``extract_mesh``, default clean mode) of a sphere shell with flags from the
  exact sphere crossings; GPU: 4M voxels, target ≤ 50 ms.
* ``bake``: sparse trilinear sampling of 6 attribute channels at 4096² points near the surface;
  GPU target ≤ 200 ms.
* ``encode``: mesh → O-Voxel shape encode (``kernels.ovoxel_encode.encode_shape_torch`` on the device vs
  the numpy codec ``backend.ovoxel.encode_shape``, threaded) of a UV sphere; GPU: 100k triangles at
  R = 1024 (``--quick``: R = 512); CPU: 20k triangles at R = 256 (``--quick``: R = 128). Also reports
  whether voxels / flags match and the largest dual-vertex difference.

Every time is the minimum over ``--reps`` runs after a warm-up (CUDA: synchronised). On a machine
without CUDA the Triton rows are skipped (the CPU interpreter is a correctness tool, not a speed one)
and the script says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.modules.sparse.conv import build_neighbor_map  # noqa: E402
from benchmarks.timing import bench  # noqa: E402
from kernels import attr_sample, mesh_extract, registry, sparse_conv  # noqa: E402


#: ``--interpret-smoke``: tiny sizes, Triton rows through the CPU interpreter.
SMOKE = False


def _with_mode(mode: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        old = os.environ.get(registry.ENV_VAR)
        os.environ[registry.ENV_VAR] = mode
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop(registry.ENV_VAR, None)
            else:
                os.environ[registry.ENV_VAR] = old
    return run


def _spconv_conv(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor) -> Callable[[], Any] | None:
    """spconv SubMConv3d forward with cached indices, or None when spconv is missing (UNTESTED here)."""
    try:
        import spconv.pytorch as spc  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001
        return None
    c_out, c_in = weight.shape[0], weight.shape[-1]
    conv = spc.SubMConv3d(c_in, c_out, 3, bias=False, indice_key="bench").to(feats.device, feats.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)  # KRSC layout = [C_out, 3, 3, 3, C_in]
    spatial = (coords[:, 1:].max(0).values + 1).tolist()
    x = spc.SparseConvTensor(feats, coords, spatial, 1)
    with torch.no_grad():
        indice_dict = conv(x).indice_dict

    def run() -> torch.Tensor:
        t = spc.SparseConvTensor(feats, coords, spatial, 1)
        t.indice_dict = indice_dict
        with torch.no_grad():
            return conv(t).features
    return run


def shell_voxels(n_target: int, band: float = 0.9) -> tuple[torch.Tensor, float, int]:
    """Voxels whose centre lies within ``band`` of a sphere sized for about ``n_target`` voxels.

    Returns ``(coords [N, 3] int32 in lexicographic order, radius, R)``. With ``band ≥ √3/2`` every
    voxel around a primal edge that the sphere crosses is present, so the decoded mesh is closed.
    Built per (x, y) column from the analytic z intervals (no R³ enumeration).
    """
    r = math.sqrt(n_target / (4 * math.pi * 2 * band))
    R = int(2 * (r + band)) + 4
    ctr = R / 2.0
    ax = torch.arange(R, dtype=torch.float64) + 0.5 - ctr
    dxy2 = (ax[:, None] ** 2 + ax[None, :] ** 2).reshape(-1)               # [R*R] column (x, y)
    hi2 = (r + band) ** 2 - dxy2
    lo2 = ((r - band) ** 2 - dxy2).clamp(min=0)
    a = torch.sqrt(lo2)
    b = torch.sqrt(hi2.clamp(min=0))
    full = lo2 <= 0                                     # the inner sphere misses this column: one interval
    zs, xs = [], []
    for lo_d, hi_d, use in ((torch.where(full, -b, -b), torch.where(full, b, -a), hi2 >= 0),
                            (a, b, (hi2 >= 0) & ~full)):
        lo_i = torch.ceil(lo_d + ctr - 0.5).long().clamp(0, R - 1)
        hi_i = torch.floor(hi_d + ctr - 0.5).long().clamp(-1, R - 1)
        cnt = torch.where(use & (hi_i >= lo_i), hi_i - lo_i + 1, torch.zeros_like(lo_i))
        col = torch.repeat_interleave(torch.arange(R * R), cnt)
        start = torch.repeat_interleave(lo_i, cnt)
        off = torch.arange(int(cnt.sum())) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        xs.append(col)
        zs.append(start + off)
    col = torch.cat(xs)
    z = torch.cat(zs)
    coords = torch.stack([col // R, col % R, z], 1)
    key = (coords[:, 0] * R + coords[:, 1]) * R + coords[:, 2]
    key = torch.unique(key)                                                   # sorted = lexicographic
    coords = torch.stack([key // (R * R), (key // R) % R, key % R], 1).int()
    return coords, r, R


def sphere_ovoxel(n_target: int, device: torch.device, seed: int = 0):
    """A closed sphere O-Voxel of about ``n_target`` voxels: flags where the sphere crosses primal edges."""
    c64, r, R = shell_voxels(n_target)
    c = c64.to(device)
    centre = torch.full((3,), R / 2.0, dtype=torch.float64, device=device)
    corner = c.double() + 1.0                                                 # max corner of each voxel
    flags = torch.zeros(c.shape[0], 3, dtype=torch.bool, device=device)
    f0 = (corner - centre).norm(dim=1) - r
    for a in range(3):
        e = corner.clone()
        e[:, a] -= 1.0                                                        # edge from (corner - e_a) to corner
        flags[:, a] = (f0 > 0) != ((e - centre).norm(dim=1) - r > 0)
    g = torch.Generator(device="cpu").manual_seed(seed)
    dv = torch.rand(c.shape[0], 3, generator=g).to(device)
    gamma = (torch.rand(c.shape[0], 1, generator=g) * 2).to(device)
    return c, dv, flags, gamma, R


def run_conv(device: torch.device, quick: bool, reps: int, triton_ok: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if device.type == "cuda":
        cases = [(1_000_000, 256, torch.float16), (1_000_000, 64, torch.float16), (1_000_000, 256, torch.bfloat16)]
        if quick:
            cases = [(200_000, 256, torch.float16)]
    else:
        cases = [(100_000, 64, torch.float32), (20_000, 256, torch.float32)]
        if quick:
            cases = [(20_000, 64, torch.float32)]
        if SMOKE:
            cases = [(400, 16, torch.float32)]
    for n, ch, dtype in cases:
        c3 = shell_voxels(n)[0]
        coords = torch.cat([torch.zeros(c3.shape[0], 1, dtype=torch.int32), c3], 1).to(device)
        t0 = time.perf_counter()
        nbr = build_neighbor_map(coords)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_map = time.perf_counter() - t0
        g = torch.Generator(device="cpu").manual_seed(0)
        feats = torch.randn(coords.shape[0], ch, generator=g).to(device, dtype)
        w = (torch.randn(ch, 3, 3, 3, ch, generator=g) / math.sqrt(27 * ch)).to(device, dtype)
        b = torch.randn(ch, generator=g).to(device, dtype)
        row: dict[str, Any] = dict(case="conv", n=int(coords.shape[0]), channels=ch, dtype=str(dtype).split(".")[1],
                                   device=device.type, nbr_map_ms=1e3 * t_map,
                                   taps_per_voxel=float((nbr >= 0).sum(1).double().mean()))
        with torch.no_grad():
            ref = sparse_conv._reference_conv(feats, nbr, w, b)
            row["reference_ms"] = 1e3 * bench(lambda: sparse_conv._reference_conv(feats, nbr, w, b), reps, device)
            if triton_ok:
                from kernels import triton_sparse_conv as tk

                out = tk.submanifold_conv3d(feats, nbr, w, b)
                row["max_abs_err_vs_reference"] = float((out.float() - ref.float()).abs().max())
                row["triton_ms"] = 1e3 * bench(lambda: tk.submanifold_conv3d(feats, nbr, w, None), reps, device)
                old_skip = tk.SKIP_EMPTY_TAPS
                tk.SKIP_EMPTY_TAPS = True  # the tap-major variant that skips empty taps
                try:
                    row["triton_skip_empty_ms"] = 1e3 * bench(lambda: tk.submanifold_conv3d(feats, nbr, w, None),
                                                              reps, device)
                finally:
                    tk.SKIP_EMPTY_TAPS = old_skip
            sp = _spconv_conv(coords, feats, w) if device.type == "cuda" else None
            if sp is not None:
                row["spconv_ms"] = 1e3 * bench(sp, reps, device)
        flops = 2.0 * float((nbr >= 0).sum()) * ch * ch
        for k in ("reference_ms", "triton_ms", "triton_skip_empty_ms", "spconv_ms"):
            if k in row:
                row[k.replace("_ms", "_tflops")] = flops / (row[k] * 1e-3) / 1e12
        rows.append(row)
        print(json.dumps(row))
        del nbr, feats, ref
    return rows


def run_mesh(device: torch.device, quick: bool, reps: int, triton_ok: bool) -> list[dict[str, Any]]:
    n = (4_000_000 if not quick else 500_000) if device.type == "cuda" else (250_000 if not quick else 50_000)
    if SMOKE:
        n = 3000
    c, dv, flags, gamma, R = sphere_ovoxel(n, device)
    row: dict[str, Any] = dict(case="mesh", n=int(c.shape[0]), R=R, device=device.type)

    def ext() -> Any:
        return mesh_extract.extract_mesh(c, dv, flags, gamma, resolution=R)

    v, f = _with_mode("reference", ext)()
    row["faces"] = int(f.shape[0])
    row["reference_ms"] = 1e3 * bench(_with_mode("reference", ext), reps, device)
    if triton_ok:
        v2, f2 = _with_mode("triton", ext)()
        row["same_faces_as_reference"] = bool(torch.equal(f, f2))
        row["triton_ms"] = 1e3 * bench(_with_mode("triton", ext), reps, device)
        idx = mesh_extract.SortedVoxelIndex.build(c.long(), R)
        from kernels import triton_mesh_extract as tk

        row["triton_lookup_only_ms"] = 1e3 * bench(lambda: tk.quad_neighbours(idx, c, flags), reps, device)
    row["official_mode_reference_ms"] = 1e3 * bench(
        _with_mode("reference", lambda: mesh_extract.extract_mesh(c, dv, flags, gamma, resolution=R, official=True)),
        reps, device)
    try:
        from backend.ovoxel import decode_mesh

        cn, dvn, fln, gn = (x.cpu().numpy() for x in (c, dv, flags, gamma))
        row["numpy_codec_ms"] = 1e3 * bench(lambda: decode_mesh(cn, dvn, fln, gn, resolution=R), 1,
                                            torch.device("cpu"))
    except NotImplementedError:
        pass
    print(json.dumps(row))
    return [row]


def run_bake(device: torch.device, quick: bool, reps: int, triton_ok: bool) -> list[dict[str, Any]]:
    if device.type == "cuda":
        side, n = (4096, 1_000_000) if not quick else (1024, 250_000)
    else:
        side, n = (512, 250_000) if not quick else (256, 50_000)
    if SMOKE:
        side, n = 32, 3000
    c, _, _, _, R = sphere_ovoxel(n, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    attrs = torch.rand(c.shape[0], 6, generator=g).to(device)
    P = side * side
    pick = torch.randint(0, c.shape[0], (P,), generator=g).to(device)
    pts = ((c[pick].float() + torch.rand(P, 3, generator=g).to(device)) / R - 0.5).contiguous()
    sampler = attr_sample.AttributeSampler(c, attrs, R)
    row: dict[str, Any] = dict(case="bake", texture=f"{side}x{side}", points=P, voxels=int(c.shape[0]), R=R,
                               device=device.type)
    ref = attr_sample._reference_sample(sampler.index, sampler.attrs, pts, sampler.lo, sampler.s)
    row["reference_ms"] = 1e3 * bench(
        lambda: attr_sample._reference_sample(sampler.index, sampler.attrs, pts, sampler.lo, sampler.s), reps, device)
    if triton_ok:
        from kernels import triton_attr_sample as tk

        out = tk.sample(sampler.index, sampler.attrs, pts, sampler.lo, sampler.s)
        row["max_abs_err_vs_reference"] = float((out - ref).abs().max())
        row["triton_ms"] = 1e3 * bench(lambda: tk.sample(sampler.index, sampler.attrs, pts, sampler.lo, sampler.s),
                                       reps, device)
    try:
        from backend.ovoxel import sample_attributes

        cn, an, pn = c.cpu().numpy(), attrs.cpu().numpy(), pts.cpu().numpy()
        row["numpy_codec_ms"] = 1e3 * bench(lambda: sample_attributes(cn, an, R, ((-.5,) * 3, (.5,) * 3), pn), 1,
                                            torch.device("cpu"))
    except NotImplementedError:
        pass
    print(json.dumps(row))
    return [row]


def run_encode(device: torch.device, quick: bool, reps: int, triton_ok: bool) -> list[dict[str, Any]]:
    import numpy as np

    from backend.ovoxel import encode_shape
    from backend.ovoxel.shapes import uv_sphere
    from kernels.ovoxel_encode import encode_shape_torch

    if device.type == "cuda":
        (n_lat, n_lon), R = (113, 446), (1024 if not quick else 512)
    else:
        (n_lat, n_lon), R = (71, 142), (256 if not quick else 128)
    if SMOKE:
        (n_lat, n_lon), R = (12, 24), 16
    v, f = uv_sphere(0.45, n_lat, n_lon)
    row: dict[str, Any] = dict(case="encode", faces=int(f.shape[0]), R=R, device=device.type)
    ot = encode_shape_torch(v, f, R, device=device)
    st = ot.meta["encode_stats"]
    row.update(voxels=int(ot.num_voxels), crossings=int(st["crossings"]), super_slabs=int(st["super_slabs"]))
    row["torch_ms"] = 1e3 * bench(lambda: encode_shape_torch(v, f, R, device=device), reps, device)
    on = encode_shape(v, f, R)
    row["numpy_codec_ms"] = 1e3 * bench(lambda: encode_shape(v, f, R), 1, torch.device("cpu"))
    same = on.coords.shape == ot.coords.shape and bool(np.array_equal(on.coords, ot.coords))
    row["same_voxels_as_numpy"] = same
    row["same_flags_as_numpy"] = same and bool(np.array_equal(on.intersected, ot.intersected))
    if same and on.num_voxels:
        row["max_dual_diff_vs_numpy"] = float(np.abs(on.dual_vertices - ot.dual_vertices).max())
    print(json.dumps(row))
    return [row]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cases", default="conv,mesh,bake,encode")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--interpret-smoke", action="store_true",
                    help="CPU only: run the Triton rows under TRITON_INTERPRET=1 on tiny sizes (checks this "
                         "script's GPU code path; the times mean nothing)")
    args = ap.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
        global SMOKE
        SMOKE = True
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    triton_ok = (device.type == "cuda" or SMOKE) and registry.triton_available()
    print(f"# device={device} torch={torch.__version__} triton={registry._triton_version()} "
          f"threads={torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"# gpu={torch.cuda.get_device_name(device)}")
    if not triton_ok:
        why = "no CUDA device" if device.type != "cuda" else "triton not available"
        print(f"# GPU part skipped ({why}): only the PyTorch references are timed, at CPU sizes")
    rows: list[dict[str, Any]] = []
    for case in args.cases.split(","):
        rows += {"conv": run_conv, "mesh": run_mesh, "bake": run_bake,
                 "encode": run_encode}[case](device, args.quick, args.reps, triton_ok)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
