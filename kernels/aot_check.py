"""Compile every Triton kernel for NVIDIA GPUs ahead of time, on a machine without a GPU.

``python -m kernels.aot_check [--arch 90 80] [--quick]`` lowers each kernel through Triton's full
pipeline (TTIR → TTGIR → LLVM → PTX → cubin with the bundled ``ptxas``) for the given compute
capabilities and prints the shared memory each variant uses. The CPU interpreter does not catch
compile-only errors (layouts, unsupported casts, register/shared-memory limits); this does. Integer
and pointer arguments are given Triton's "divisible by 16" hint, as the JIT launcher does for
aligned tensors and channel counts that are multiples of 16.

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled); exits 2 if it is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["compile_all"]


def _variants(quick: bool) -> list[tuple[str, Any, dict[str, str], dict[str, Any], dict[str, int]]]:
    from . import triton_attr_sample as A
    from . import triton_mesh_extract as M
    from . import triton_sparse_conv as C

    out = []
    conv_dtypes = [("fp16", False)] if quick else [("fp16", False), ("bf16", False), ("fp32", True)]
    for dt, f32 in conv_dtypes:
        for skip in ([False] if quick else [False, True]):
            sig = {"feats_ptr": f"*{dt}", "nbr_ptr": "*i64", "rows_ptr": "*i64", "w_ptr": f"*{dt}",
                   "bias_ptr": f"*{dt}", "out_ptr": f"*{dt}", "M": "i32", "C_IN": "i32", "C_OUT": "i32",
                   "HAS_ROWS": "constexpr", "HAS_BIAS": "constexpr", "F32_DOT": "constexpr",
                   "PRECISION": "constexpr", "SKIP_EMPTY": "constexpr", "BLOCK_M": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
            const = {"HAS_ROWS": False, "HAS_BIAS": True, "F32_DOT": f32, "PRECISION": "ieee" if f32 else "tf32",
                     "SKIP_EMPTY": skip, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}
            out.append((f"subm_conv3d {dt} skip_empty={skip}", C._subm_conv3d_kernel, sig, const,
                        dict(num_warps=8, num_stages=3)))
    if not quick:  # small-channel tiles (first encoder / last decoder layers): fp16, 64 x 16 x 16
        sig0, const0 = out[0][2], dict(out[0][3])
        const0.update(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, HAS_ROWS=True)
        out.append(("subm_conv3d fp16 rows 64x16x16", out[0][1], sig0, const0, dict(num_warps=4, num_stages=3)))
        sig = {"pts_ptr": "*fp32", "keys_ptr": "*i64", "rows_ptr": "*i64", "attrs_ptr": "*fp32", "out_ptr": "*fp32",
               "P": "i32", "N": "i32", "C": "i32", "R": "i32", "STEPS": "i32", "lo_x": "fp32", "lo_y": "fp32",
               "lo_z": "fp32", "s_x": "fp32", "s_y": "fp32", "s_z": "fp32", "BLOCK_P": "constexpr",
               "BLOCK_C": "constexpr"}
        out.append(("attr_sample", A._attr_sample_kernel, sig, {"BLOCK_P": 256, "BLOCK_C": 8}, dict(num_warps=4)))
    sig = {"coords_ptr": "*i32", "flags_ptr": "*u8", "keys_ptr": "*i64", "rows_ptr": "*i64", "out_ptr": "*i64",
           "N": "i32", "R": "i32", "STEPS": "i32", "BLOCK": "constexpr"}
    out.append(("quad_neighbours", M._quad_neighbours_kernel, sig, {"BLOCK": 256}, dict(num_warps=4)))
    return out


def compile_all(archs: list[int], quick: bool = False) -> list[dict[str, Any]]:
    """Compile every kernel variant for each compute capability; returns one record per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, const, opts in _variants(quick):
            names = list(sig)
            attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(names)
                     if sig[k].startswith("*") or k in ("C_IN", "C_OUT")}
            t0 = time.perf_counter()
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                                    target=target, options=opts)
            results.append(dict(kernel=name, arch=f"sm_{arch}", shared_bytes=int(kernel.metadata.shared),
                                seconds=round(time.perf_counter() - t0, 2)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compile the Triton kernels for NVIDIA GPUs without a GPU")
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--quick", action="store_true", help="only the fp16 conv and the mesh lookup")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    for r in compile_all(args.arch, args.quick):
        print(f"ok  {r['arch']}  {r['kernel']:<36} shared {r['shared_bytes']:>6} B  {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
