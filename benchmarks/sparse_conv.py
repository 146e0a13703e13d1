"""Benchmark the pure-PyTorch submanifold sparse conv (and one full-size SC-VAE decoder stage).

Usage (from the repo root)::

    .venv/bin/python -m benchmarks.sparse_conv                 # default set (CPU)
    .venv/bin/python -m benchmarks.sparse_conv --sizes 100000 --channels 64 --reps 3
    .venv/bin/python -m benchmarks.sparse_conv --spconv /path/with/spconv   # side-by-side, if installed
    .venv/bin/python -m benchmarks.sparse_conv --device cuda

Inputs are sphere shells (surface-like, as TRELLIS structures: ~17 of 27 neighbours present).
Reported per case: neighbour-map build time, conv forward time (min over ``--reps``), and the peak
extra memory of the forward (CUDA: ``max_memory_allocated``; CPU: peak RSS growth sampled every
2 ms from ``/proc/self/statm``). The optional spconv comparison runs spconv's CPU package (algo
Native) in a subprocess with ``OMP_NUM_THREADS=1`` — it gives wrong results with more threads —
interleaved with our two algorithms in the same process (same load, same single thread), and checks
its output against ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.modules.sparse import SparseConv3d, SparseTensor, build_neighbor_map  # noqa: E402
from backend.modules.sparse.conv import build_pair_lists, submanifold_conv3d  # noqa: E402


def shell_coords(n_target: int, seed: int = 0) -> torch.Tensor:
    """``[N, 4]`` int32 voxels of a ~1.5-voxel-thick sphere shell with about ``n_target`` voxels."""
    r = math.sqrt(n_target / (4 * math.pi * 2.04))
    m = int(4 * math.pi * r * r * 6)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(m, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    rad = r + torch.rand(m, 1, generator=g) * 1.5
    p = torch.floor(d * rad + r + 3).to(torch.int32)
    p = torch.unique(p, dim=0)
    return torch.cat([torch.zeros(p.shape[0], 1, dtype=torch.int32), p], 1)


class PeakRSS:
    """Context manager sampling the process RSS; ``.peak`` = max growth over the entry value (bytes)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __enter__(self) -> "PeakRSS":
        self.base = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss() - self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, reps: int) -> tuple[float, int]:
    """(min seconds over ``reps``, peak extra bytes of one call)."""
    best = float("inf")
    peak = 0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _sync(device)
            t = time.perf_counter()
            out = fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as pr:
                t = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - t)
            peak = max(peak, pr.peak)
        del out
    return best, peak


def bench_conv(n: int, cin: int, cout: int, reps: int, device: torch.device, dtype: torch.dtype,
               algos: list[str]) -> dict:
    coords = shell_coords(n).to(device)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(coords.shape[0], cin, generator=g).to(device, dtype)
    conv = SparseConv3d(cin, cout).to(device, dtype)
    x = SparseTensor(feats, coords)
    _sync(device)
    t = time.perf_counter()
    nbr = build_neighbor_map(x.coords)
    _sync(device)
    t_nbr = time.perf_counter() - t
    t = time.perf_counter()
    pairs = build_pair_lists(nbr)
    _sync(device)
    t_pairs = time.perf_counter() - t
    valid = float((nbr >= 0).sum()) / nbr.shape[0]
    gflop = 2 * coords.shape[0] * 27 * cin * cout / 1e9
    res = {"N": int(coords.shape[0]), "cin": cin, "cout": cout, "taps": round(valid, 1),
           "nbr_ms": round(t_nbr * 1e3, 1), "pair_lists_ms": round(t_pairs * 1e3, 1)}
    best = {a: float("inf") for a in algos}
    peaks = {a: 0 for a in algos}
    with torch.no_grad():
        for _ in range(reps):  # algorithms interleaved per repetition: both see the same load drift
            for algo in algos:
                t_fwd, peak = measure(lambda: submanifold_conv3d(feats, nbr, conv.weight, conv.bias, algo, pairs),
                                      device, 1)
                best[algo] = min(best[algo], t_fwd)
                peaks[algo] = max(peaks[algo], peak)
    for algo in algos:
        res[f"{algo}_ms"] = round(best[algo] * 1e3, 1)
        res[f"{algo}_peak_mb"] = round(peaks[algo] / 2**20, 1)
        res[f"{algo}_gflops_dense_eq"] = round(gflop / best[algo], 1)
    res["out_mb"] = round(coords.shape[0] * cout * feats.element_size() / 2**20, 1)
    return res


def bench_decoder_stage(n: int, device: torch.device, dtype: torch.dtype, reps: int,
                        channels: int = 256, out_channels: int = 128, blocks: int = 8) -> dict:
    """One official decoder stage: ``blocks`` × ConvNeXt(C) + C2S(C → C') with predicted subdivision."""
    from backend.models.sc_vaes import SparseConvNeXtBlock3d, SparseResBlockC2S3d

    torch.manual_seed(0)
    stage = torch.nn.ModuleList([SparseConvNeXtBlock3d(channels) for _ in range(blocks)]
                                + [SparseResBlockC2S3d(channels, out_channels)]).to(device, dtype).eval()
    coords = shell_coords(n, seed=3).to(device)
    feats = torch.randn(coords.shape[0], channels, generator=torch.Generator().manual_seed(2)).to(device, dtype)

    def run() -> SparseTensor:
        h = SparseTensor(feats, coords)  # fresh coords cache: the neighbour map build is included
        for b in stage[:-1]:
            h = b(h)
        h, _ = stage[-1](h)
        return h

    with torch.no_grad():
        out = run()
        t, peak = measure(run, device, reps)
    return {"N": int(coords.shape[0]), "stage": f"{blocks}x ConvNeXt({channels}) + C2S({channels}->{out_channels})",
            "N_out": int(out.num_rows), "fwd_ms": round(t * 1e3, 1), "peak_mb": round(peak / 2**20, 1)}


_SPCONV_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import spconv.pytorch as spconv
import spconv.pytorch.ops as ops
ops.get_current_stream = lambda: 0   # CPU-only build calls a CUDA stream getter unconditionally
from benchmarks.sparse_conv import shell_coords
from backend.modules.sparse import SparseConv3d, build_neighbor_map
from backend.modules.sparse.conv import build_pair_lists, submanifold_conv3d
n, cin, cout, reps = (int(a) for a in sys.argv[3:7])
coords = shell_coords(n)
feats = torch.randn(coords.shape[0], cin, generator=torch.Generator().manual_seed(1))
ours = SparseConv3d(cin, cout)
sub = spconv.SubMConv3d(cin, cout, 3, bias=True, indice_key="k", algo=spconv.ConvAlgo.Native)
res = {}
with torch.no_grad():
    sub.weight.copy_(ours.weight); sub.bias.copy_(ours.bias)
    spatial = (coords[:, 1:].max(0).values + 1).tolist()
    t0 = time.perf_counter()
    y = sub(spconv.SparseConvTensor(feats, coords, spatial, 1))
    res["spconv_rulebook_plus_fwd_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    t0 = time.perf_counter()
    nbr = build_neighbor_map(coords)
    pairs = build_pair_lists(nbr)
    res["ours_nbr_plus_pairs_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    best = {"spconv": 9e9, "gather": 9e9, "pairs": 9e9}
    outs = {}
    for _ in range(reps):   # interleaved, so both see the same machine load
        x = spconv.SparseConvTensor(feats, coords, spatial, 1)
        x.indice_dict = y.indice_dict
        t0 = time.perf_counter(); outs["spconv"] = sub(x).features
        best["spconv"] = min(best["spconv"], time.perf_counter() - t0)
        for algo in ("gather", "pairs"):
            t0 = time.perf_counter(); outs[algo] = submanifold_conv3d(feats, nbr, ours.weight, ours.bias, algo, pairs)
            best[algo] = min(best[algo], time.perf_counter() - t0)
    for k, v in best.items():
        res[f"{k}_1thr_ms"] = round(v * 1e3, 1)
    res["max_abs_diff_spconv_vs_ours"] = float((outs["spconv"] - outs["gather"]).abs().max())
print(json.dumps(res))
"""


def bench_spconv(path: str, n: int, cin: int, cout: int, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SPCONV_CHILD, path, str(REPO), str(n), str(cin), str(cout), str(reps)],
                       capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        return {"spconv_error": r.stderr.strip().splitlines()[-1] if r.stderr else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--algos", nargs="+", default=["gather", "pairs"], choices=["gather", "pairs"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-gflop", type=float, default=4000.0,
                    help="skip conv cases above this many GFLOP (dense-equivalent)")
    ap.add_argument("--stage-voxels", type=int, default=50_000, help="0 skips the decoder-stage case")
    ap.add_argument("--spconv", default=None, help="sys.path entry holding the spconv CPU package")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"# torch {torch.__version__}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
          f"loadavg {os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        for c in args.channels:
            gflop = 2 * n * 27 * c * c / 1e9
            if gflop > args.max_gflop:
                print(json.dumps({"N": n, "cin": c, "cout": c, "skipped": f"{gflop:.0f} GFLOP > --max-gflop"}))
                continue
            reps = args.reps if gflop < 500 else 1
            res = bench_conv(n, c, c, reps, device, dtype, args.algos)
            if args.spconv:
                res.update(bench_spconv(args.spconv, n, c, c, reps))
            print(json.dumps(res), flush=True)
    if args.stage_voxels:
        from backend.modules.sparse import conv_torch
        for algo in args.algos:
            conv_torch.ALGORITHM = algo
            res = bench_decoder_stage(args.stage_voxels, device, dtype, 1)
            res["algo"] = algo
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
