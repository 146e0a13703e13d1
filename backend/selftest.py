"""``trellis2 selftest [--model-dir D]``: print a JSON report of the backend environment.

The add-on runs this as a one-shot child ("Check backend") and shows the JSON in Preferences, so
install problems become a readable checklist before the first job. Keys:

``ok`` (bool), ``problems`` (list of human sentences), ``python`` {version, executable, platform},
``numpy``, ``torch`` {version, cuda, cuda_version, device, gpu, vram_total, ...} (``error`` if it does not
import), ``modules`` {name: version | None} for the optional extensions, ``sparse_conv`` and
``attention`` (available backends, in preference order), ``weights`` {model_dir, found, missing}.

Exit code 0 when ``ok``, 1 otherwise (the JSON is printed either way).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Official checkpoint stems (microsoft/TRELLIS.2-4B/ckpts/*.json + .safetensors)
EXPECTED_CKPTS: tuple[str, ...] = (
    "ss_flow_img_dit_1_3B_64_bf16",
    "shape_dec_next_dc_f16c32_fp16",
    "slat_flow_img2shape_dit_1_3B_512_bf16",
    "slat_flow_img2shape_dit_1_3B_1024_bf16",
    "tex_dec_next_dc_f16c32_fp16",
    "slat_flow_imgshape2tex_dit_1_3B_512_bf16",
    "slat_flow_imgshape2tex_dit_1_3B_1024_bf16",
    "shape_enc_next_dc_f16c32_fp16",
)
SS_DECODER = "ss_dec_conv3d_16l8_fp16"
OPTIONAL_MODULES: tuple[str, ...] = (
    "triton", "flex_gemm", "spconv", "torchsparse", "o_voxel", "cumesh", "nvdiffrast",
    "flash_attn", "xformers", "sageattention", "safetensors", "PIL", "trimesh", "scipy", "transformers",
)


# Pure-Python packages: found + installed metadata is enough (importing transformers alone takes
# seconds). Compiled extensions are really imported: a broken CUDA build fails exactly there.
_METADATA_ONLY = {"safetensors": "safetensors", "PIL": "pillow", "trimesh": "trimesh", "scipy": "scipy",
                  "transformers": "transformers"}


def _module_version(name: str) -> str | None:
    """The module's version string if it is importable, else None (never raises)."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    if name in _METADATA_ONLY:
        import importlib.metadata as md

        try:
            return md.version(_METADATA_ONLY[name])
        except md.PackageNotFoundError:
            pass
    try:
        mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - broken installs raise anything
        return None
    return str(getattr(mod, "__version__", "present"))


def device_info() -> dict[str, Any]:
    """torch / CUDA / GPU facts (``torch: None`` plus ``torch_error`` if torch does not import)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return {"torch": None, "torch_error": f"{type(exc).__name__}: {exc}", "cuda": False,
                "device": "none", "gpu": None, "vram_total": None}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available()),
                            "cuda_version": getattr(torch.version, "cuda", None), "gpu": None,
                            "vram_total": None, "device": "cpu", "threads": torch.get_num_threads()}
    if info["cuda"]:
        try:
            props = torch.cuda.get_device_properties(0)
            info.update(device="cuda", gpu=props.name, vram_total=int(props.total_memory),
                        capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count(),
                        bf16=bool(torch.cuda.is_bf16_supported()))
        except Exception as exc:  # noqa: BLE001
            info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    else:
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
        if info["mps"]:
            info.update(device="mps", gpu="Apple GPU (MPS)")
    return info


def _backends(modules: dict[str, str | None], dev: dict[str, Any]) -> tuple[list[str], list[str]]:
    sparse = [n for n in ("flex_gemm", "spconv", "torchsparse") if modules.get(n)]
    if dev.get("torch"):
        if modules.get("triton") and dev.get("cuda"):
            sparse.append("triton")
        sparse.append("torch")  # the pure-torch reference in kernels/
    attn = [n for n in ("flash_attn", "xformers", "sageattention") if modules.get(n)]
    if dev.get("torch"):
        attn.append("sdpa")
    return sparse, attn


def weights_report(model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Which expected weight files exist under ``model_dir`` (official HF layout)."""
    if not model_dir:
        return {"model_dir": None, "found": [], "missing": ["(no model folder configured)"]}
    root = Path(model_dir).expanduser()
    found: list[str] = []
    missing: list[str] = []
    for name in ("pipeline.json", "texturing_pipeline.json"):
        (found if (root / name).is_file() else missing).append(name)
    for stem in EXPECTED_CKPTS:
        for ext in (".json", ".safetensors"):
            rel = f"ckpts/{stem}{ext}"
            (found if (root / rel).is_file() else missing).append(rel)
    ss_dirs = [root / "ckpts", root.parent / "TRELLIS-image-large" / "ckpts"]
    ss = [d for d in ss_dirs if (d / f"{SS_DECODER}.safetensors").is_file()]
    (found if ss else missing).append(f"{SS_DECODER}.safetensors")
    dino_dirs = [root / "dinov3", root.parent / "dinov3-vitl16-pretrain-lvd1689m"]
    dino = [d for d in dino_dirs if (d / "model.safetensors").is_file()]
    (found if dino else missing).append("dinov3/model.safetensors")
    return {"model_dir": str(root), "exists": root.is_dir(), "found": found, "missing": missing}


def collect(model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The full self-test report (see the module docstring)."""
    import numpy as np

    dev = device_info()
    modules = {name: _module_version(name) for name in OPTIONAL_MODULES}
    sparse, attn = _backends(modules, dev)
    weights = weights_report(model_dir)
    problems: list[str] = []
    if not dev.get("torch"):
        problems.append(f"PyTorch does not import: {dev.get('torch_error')}")
    elif not dev.get("cuda"):
        problems.append("CUDA is not available: generation will run on the CPU (very slow).")
    for dep in ("safetensors", "PIL"):
        if not modules.get(dep):
            problems.append(f"Python package {dep!r} is missing.")
    if weights["missing"]:
        problems.append(f"{len(weights['missing'])} weight file(s) missing, e.g. {weights['missing'][0]}")
    return {
        "ok": bool(dev.get("torch")) and not weights["missing"] and all(modules.get(d) for d in ("safetensors", "PIL")),
        "problems": problems,
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "numpy": np.__version__,
        "torch": dev,
        "modules": modules,
        "sparse_conv": sparse,
        "attention": attn,
        "weights": weights,
    }


def run(args: argparse.Namespace) -> int:
    # Keep stdout clean for the JSON: whatever the imports print goes to stderr meanwhile.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        report = collect(args.model_dir)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    json.dump(report, sys.stdout, indent=None if args.compact else 1, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0 if report["ok"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``selftest`` subcommand (no torch import here)."""
    p = subparsers.add_parser("selftest", help="print a JSON report of the backend environment")
    p.add_argument("--model-dir", metavar="DIR", help="TRELLIS.2 weights folder to check")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    p.set_defaults(func=run)
