"""BiRefNet golden suite: ``python -m backend.golden ../shared/golden_birefnet [A B C]``.

The folder holds key/shape manifests (``manifest_<backbone>.json``) and cases ``case_<X>.json/.safetensors``
produced by the upstream code with deterministic *recipe* weights (its README §4). Model cases (A, B)
compare the logits and ~55 intermediates (whole tensors or their ``@chmean`` / ``@ch16[sN]`` views) with
each tensor's own ``atol``; the wrapper case (C) runs :class:`~backend.pipelines.rembg.BiRefNetRemover`
end to end on an image and compares the resized input, model input, logits and both masks.
Which backbone and seed a case uses is read from its JSON, never assumed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import CaseReport
from ..models.birefnet import BiRefNet, config_from_shapes, recipe_weights

__all__ = ["is_birefnet_folder", "build_recipe_model", "run_birefnet_case",
           "birefnet_case_names", "capture_intermediates"]


def is_birefnet_folder(root: Path) -> bool:
    return any(Path(root).glob("manifest_swin_*.json"))


def birefnet_case_names(root: Path) -> list[str]:
    return sorted(p.stem.removeprefix("case_") for p in Path(root).glob("case_*.json"))


def build_recipe_model(manifest_path: Path, base_seed: int = 1234) -> BiRefNet:
    """A BiRefNet sized from a manifest, loaded strictly with recipe weights (unused heads dropped)."""
    from ..models.birefnet import UNUSED_KEYS

    man = json.loads(Path(manifest_path).read_text())["tensors"]
    weights = recipe_weights(man, base_seed)
    for k in UNUSED_KEYS:
        weights.pop(k, None)
    model = BiRefNet(config_from_shapes({k: tuple(v.shape) for k, v in weights.items()}))
    model.load_state_dict(weights, strict=True)
    return model.eval()


def capture_intermediates(model: BiRefNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` and return the logits plus the intermediates named as in the golden files."""
    got: dict[str, torch.Tensor] = {}
    bb_calls: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    hooks = [model.bb.register_forward_hook(lambda m, i, o: bb_calls.append((i[0], o)))]

    def grab(name: str) -> Callable:
        return lambda m, i, o: got.__setitem__(name, o)

    named = dict(model.named_modules())
    wanted = ["squeeze_module", "squeeze_module.0.dec_att", "decoder.decoder_block4.dec_att",
              "decoder.decoder_block1.dec_att"]
    wanted += [f"decoder.ipt_blk{k}" for k in range(1, 6)] + [f"decoder.decoder_block{k}" for k in range(1, 5)]
    wanted += [f"decoder.lateral_block{k}" for k in range(2, 5)] + [f"decoder.gdt_convs_attn_{k}" for k in range(2, 5)]
    hooks += [named[n].register_forward_hook(grab(n)) for n in wanted]
    enc = model.forward_enc

    def forward_enc(t: torch.Tensor) -> list[torch.Tensor]:
        outs = enc(t)
        for k, o in enumerate(outs, 1):
            got[f"enc.x{k}"] = o
        return outs

    model.forward_enc = forward_enc  # type: ignore[method-assign]
    try:
        got["logits"] = model(x)[-1]
    finally:
        del model.forward_enc
        for h in hooks:
            h.remove()
    (_, full), (pyr, half) = bb_calls
    got["x_pyramid"] = pyr
    for k in range(4):
        got[f"bb_full.x{k + 1}"], got[f"bb_half.x{k + 1}"] = full[k], half[k]
    return got


def _view(t: torch.Tensor, view: str | None) -> torch.Tensor:
    """A stored view of an NCHW tensor: whole, ``chmean`` or ``ch16[sN]``."""
    if view is None:
        return t
    if view == "chmean":
        return t.double().mean((2, 3)).float()
    m = re.fullmatch(r"ch16(?:s(\d+))?", view)
    if m is None:
        raise KeyError(f"unknown golden view @{view}")
    c = t.shape[1]
    s = int(m.group(1) or 1)
    return t[:, [(k * (c - 1)) // 15 for k in range(16)]][:, :, ::s, ::s]


def _compare(report: CaseReport, key: str, got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    if tuple(got.shape) != tuple(ref.shape):
        report.passed = False
        report.errors[key] = f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
        return
    d = float((got.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    report.max_abs[key] = d
    if not d <= atol:
        report.passed = False
        report.errors[key] = f"max abs diff {d:.3g} > atol {atol:.3g}"


def _model_case(root: Path, name: str, meta: dict, gold: dict[str, torch.Tensor]) -> CaseReport:
    report = CaseReport(name, True)
    model = build_recipe_model(root / f"manifest_{meta['backbone']}.json", int(meta["recipe_base_seed"]))
    tags = sorted({k.split(".", 1)[0] for k in meta["tensors"]})
    for tag in tags:
        x = gold[f"{tag}.input"]
        with torch.no_grad():
            got = capture_intermediates(model, x)
        for key, info in meta["tensors"].items():
            if not key.startswith(tag + ".") or key == f"{tag}.input":
                continue
            base, _, view = key[len(tag) + 1:].partition("@")  # e.g. "decoder.ipt_blk5", "ch16s2"
            if view == "f64":  # float64 reference of the logits
                continue
            if base not in got:
                report.passed = False
                report.errors[key] = "not produced"
                continue
            _compare(report, key, _view(got[base], view or None), gold[key], float(info["atol"]))
    return report


def _mask_check(report: CaseReport, key: str, got: np.ndarray, ref: np.ndarray) -> None:
    """|Δ| ≤ 1 on at most 0.5 % of pixels; 2 tolerated on at most 0.01 %; never more."""
    if got.shape != ref.shape:
        report.passed = False
        report.errors[key] = f"shape {got.shape} != {ref.shape}"
        return
    d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    report.max_abs[key] = float(d.max())
    frac, frac2 = float((d > 0).mean()), float((d > 1).mean())
    if d.max() > 2 or frac > 0.005 or frac2 > 1e-4:
        report.passed = False
        report.errors[key] = f"max {d.max()}, {frac:.4%} of pixels differ ({frac2:.4%} by 2)"


def _wrapper_case(root: Path, name: str, meta: dict, gold: dict[str, torch.Tensor]) -> CaseReport:
    from PIL import Image

    from ..pipelines.rembg import BiRefNetRemover

    report = CaseReport(name, True)
    backbone = meta.get("backbone") or "swin_v1_l"
    seed = int(meta.get("recipe_base_seed", 1234))
    remover = BiRefNetRemover(build_recipe_model(root / f"manifest_{backbone}.json", seed))
    img = Image.open(root / meta["input"]["file"])
    img.load()
    tens = meta["tensors"]
    resized = remover.resized_rgb(img)
    _compare(report, "resized_rgb_u8", torch.from_numpy(resized.astype(np.int16)),
             gold["resized_rgb_u8"].to(torch.int16), float(tens["resized_rgb_u8"]["atol"]))
    x = remover.model_input(resized)
    _compare(report, "model_input@corner64", x[:, :, :64, :64], gold["model_input@corner64"],
             float(tens["model_input@corner64"]["atol"]))
    _compare(report, "model_input@chmean", _view(x, "chmean"), gold["model_input@chmean"],
             float(tens["model_input@chmean"]["atol"]))
    logits = remover.logits(x)
    _compare(report, "logits", logits, gold["logits"], float(tens["logits"]["atol"]))
    m1024 = remover.mask_from_logits(logits)
    _mask_check(report, "mask_1024_u8", m1024, gold["mask_1024_u8"].numpy())
    mask = np.asarray(remover.mask_to_size(m1024, img.size))   # the model ran once, above
    _mask_check(report, "mask_u8", mask, gold["mask_u8"].numpy())
    return report


def run_birefnet_case(root: Path, name: str) -> CaseReport:
    """Run BiRefNet golden case ``name`` (``A``, ``B``, ``C`` …) from folder ``root``."""
    from safetensors.torch import load_file

    root = Path(root)
    meta = json.loads((root / f"case_{name}.json").read_text())
    gold = load_file(str(root / f"case_{name}.safetensors"))
    with torch.no_grad():
        if isinstance(meta.get("input"), dict) and "file" in meta["input"]:  # wrapper case: an image file
            return _wrapper_case(root, name, meta, gold)
        return _model_case(root, name, meta, gold)
