"""Triton kernel: submanifold 3×3×3 sparse conv as an implicit GEMM over a neighbour map.

Imported lazily by :mod:`kernels.registry` (never at ``import kernels``): Triton chooses between the
compiler and the CPU interpreter (``TRITON_INTERPRET=1``) when the ``@triton.jit`` decorators below run.

Each program computes a ``BLOCK_M × BLOCK_N`` tile of the output ``[M, C_out]``. For each of the 27
taps it loads the tap's neighbour rows from ``nbr`` (``-1`` = absent), gathers the matching
``BLOCK_M × BLOCK_K`` slice of ``feats`` (zeros for absent rows, so no im2col is materialised) and
multiplies it with the ``BLOCK_K × BLOCK_N`` slice of the tap's weight ``[27, C_in, C_out]``,
accumulating in fp32. A tap with no neighbour in the whole row block is skipped (surface-like voxel
sets have ~18 of 27 taps present per voxel, whole empty taps per block are common after sorting).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import interpreting

__all__ = ["submanifold_conv3d", "submanifold_conv3d_rows", "conv_config"]


@triton.jit
def _tap_step(feats_ptr, w_ptr, acc, idx, valid, t, k0, offs_n, mask_n, C_IN, C_OUT,
              F32_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += feats[idx, k0:k0+BK] @ w[t, k0:k0+BK, n-block] (absent rows / padded channels read 0)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < C_IN
    a = tl.load(feats_ptr + idx[:, None] * C_IN + offs_k[None, :],
                mask=valid[:, None] & mask_k[None, :], other=0.0)
    b = tl.load(w_ptr + (t * C_IN + offs_k[:, None]).to(tl.int64) * C_OUT + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    if F32_DOT:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    else:
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _subm_conv3d_kernel(
    feats_ptr, nbr_ptr, rows_ptr, w_ptr, bias_ptr, out_ptr,
    M, C_IN, C_OUT,
    HAS_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr, PRECISION: tl.constexpr,
    SKIP_EMPTY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    if HAS_ROWS:
        src = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        src = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SKIP_EMPTY:
        # tap-major loops; a tap with no neighbour in the row block is skipped (not pipelined)
        for t in range(27):
            idx = tl.load(nbr_ptr + src * 27 + t, mask=mask_m, other=-1).to(tl.int64)
            valid = idx >= 0
            if tl.max(valid.to(tl.int32), axis=0) > 0:
                for k0 in range(0, C_IN, BLOCK_K):
                    acc = _tap_step(feats_ptr, w_ptr, acc, idx, valid, t, k0, offs_n, mask_n, C_IN, C_OUT,
                                    F32_DOT, PRECISION, BLOCK_K)
    else:
        # one flat loop over (tap, K block): no data-dependent branch, so Triton can software-pipeline it
        k_iters = tl.cdiv(C_IN, BLOCK_K)
        for it in range(0, 27 * k_iters):
            t = it // k_iters
            k0 = (it - t * k_iters) * BLOCK_K
            idx = tl.load(nbr_ptr + src * 27 + t, mask=mask_m, other=-1).to(tl.int64)
            valid = idx >= 0
            acc = _tap_step(feats_ptr, w_ptr, acc, idx, valid, t, k0, offs_n, mask_n, C_IN, C_OUT,
                            F32_DOT, PRECISION, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_off = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


#: Skip taps with no neighbour in a row block (tap-major loop, not software-pipelined) instead of the
#: flat pipelined loop. None = per device: on in the CPU interpreter (cheaper), off on CUDA.
SKIP_EMPTY_TAPS: bool | None = None


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def conv_config(m: int, c_in: int, c_out: int, device: torch.device) -> dict[str, int | bool]:
    """Tile sizes and launch options for ``m`` output rows (heuristic, no autotuning).

    ``tl.dot`` needs every tile dimension ≥ 16; channel tiles are padded by masking.
    """
    cuda = device.type == "cuda"
    skip = (not cuda) if SKIP_EMPTY_TAPS is None else bool(SKIP_EMPTY_TAPS)
    if not cuda:  # interpreter: few, large programs are fastest
        return dict(BLOCK_M=_pow2_clamp(m, 16, 128), BLOCK_N=_pow2_clamp(c_out, 16, 128),
                    BLOCK_K=_pow2_clamp(c_in, 16, 64), SKIP_EMPTY=skip, num_warps=4, num_stages=1)
    block_m = 128 if m >= 64 * 1024 else 64
    block_n = _pow2_clamp(c_out, 16, 128)
    block_k = _pow2_clamp(c_in, 16, 64)
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SKIP_EMPTY=skip, num_warps=num_warps,
                num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(feats: torch.Tensor, nbr: torch.Tensor, rows: torch.Tensor | None, w_t: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """Run the kernel; ``w_t`` is ``[27, C_in, C_out]`` contiguous in ``feats.dtype``."""
    n, c_in = feats.shape
    c_out = w_t.shape[2]
    m = n if rows is None else rows.shape[0]
    out = torch.empty(m, c_out, dtype=feats.dtype, device=feats.device)
    if m == 0 or c_out == 0:
        return out
    if c_in == 0 or n == 0:
        return out.copy_((bias if bias is not None else out.new_zeros(c_out)).to(out.dtype).expand(m, c_out))
    feats = feats.contiguous()
    nbr = nbr.contiguous()
    if rows is not None:
        rows = rows.contiguous()
    cfg = conv_config(m, c_in, c_out, feats.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]))
    f32_dot = feats.dtype == torch.float32 or (interpreting() and feats.dtype == torch.bfloat16)
    _subm_conv3d_kernel[grid](
        feats, nbr, rows if rows is not None else nbr, w_t, bias if bias is not None else w_t, out,
        m, c_in, c_out,
        HAS_ROWS=rows is not None, HAS_BIAS=bias is not None, F32_DOT=f32_dot,
        PRECISION=_precision(feats.dtype),
        **cfg,
    )
    return out


def _check(feats: torch.Tensor, nbr: torch.Tensor) -> None:
    if feats.dim() != 2:
        raise ValueError(f"feats must be [N, C_in], got {tuple(feats.shape)}")
    if nbr.dim() != 2 or nbr.shape[1] != 27 or nbr.shape[0] != feats.shape[0]:
        raise ValueError(f"neighbour map must be [N, 27] with N={feats.shape[0]}, got {tuple(nbr.shape)}")
    if feats.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported feats dtype {feats.dtype}")


def submanifold_conv3d(feats: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """Triton version of :func:`kernels.sparse_conv.submanifold_conv3d` (same signature and result)."""
    _check(feats, nbr)
    c_out, c_in = weight.shape[0], weight.shape[-1]
    if feats.shape[1] != c_in:
        raise ValueError(f"conv expects {c_in} input channels, got {feats.shape[1]}")
    w_t = weight.detach().to(feats.dtype).reshape(c_out, 27, c_in).permute(1, 2, 0).contiguous()
    b = bias.detach().to(feats.dtype).contiguous() if bias is not None else None
    return _launch(feats, nbr, None, w_t, b)


def submanifold_conv3d_rows(feats: torch.Tensor, nbr: torch.Tensor, rows: torch.Tensor | None,
                            weight2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Triton version of :func:`kernels.sparse_conv.submanifold_conv3d_rows` (``weight2d [C_out, 27·C_in]``)."""
    _check(feats, nbr)
    c_in = feats.shape[1]
    c_out = weight2d.shape[0]
    if weight2d.shape[1] != 27 * c_in:
        raise ValueError(f"weight2d must be [C_out, 27*{c_in}], got {tuple(weight2d.shape)}")
    w_t = weight2d.detach().to(feats.dtype).reshape(c_out, 27, c_in).permute(1, 2, 0).contiguous()
    b = bias.detach().to(feats.dtype).contiguous() if bias is not None else None
    return _launch(feats, nbr, rows, w_t, b)
