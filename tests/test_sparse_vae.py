"""SC-VAEs and the SS decoder: golden cases, official key sets / shapes / runtime dtypes on meta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backend.golden import run_case
from backend.models import build_model
from backend.modules.sparse import SparseHierarchy, SparseTensor

VAE_CASES = ["shape_encoder", "tex_encoder", "tex_decoder_guided", "tex_decoder_encoder_cache", "ss_decoder",
             "shape_decoder"]
STEMS = ["shape_enc_next_dc_f16c32_fp16", "shape_dec_next_dc_f16c32_fp16", "tex_enc_next_dc_f16c32_fp16",
         "tex_dec_next_dc_f16c32_fp16", "ss_dec_conv3d_16l8_fp16", "ss_enc_conv3d_16l8_fp16"]


@pytest.mark.parametrize("name", VAE_CASES)
def test_golden_case(golden_dir: Path, name: str) -> None:
    report = run_case(golden_dir, name)
    assert report.passed, report.errors


@pytest.mark.parametrize("stem", STEMS)
def test_official_config_keys_shapes_dtypes(shared_dir: Path, stem: str) -> None:
    """Built from the official config on meta: exact key set, shapes, and the official runtime dtypes."""
    root = shared_dir / "official_state_dict"
    entry = json.loads((root / "_summary.json").read_text())[stem]
    manifest = json.loads((root / f"{stem}.json").read_text())
    runtime = json.loads((root / "runtime_dtypes" / f"{stem}.json").read_text())
    model = build_model(entry["cls"], entry["args"], "meta")
    sd = model.state_dict()
    assert set(sd) == set(manifest)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v[0] for k, v in manifest.items()}
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()} == {k: v[1] for k, v in runtime.items()}
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_encoder_hierarchy_drives_texture_decoder(golden_dir: Path) -> None:
    """The hierarchy returned by the encoder equals the one rebuilt from coords and reproduces the
    encoder's input rows through the texture decoder."""
    from backend.models import from_pretrained
    from safetensors.torch import load_file

    t = load_file(str(golden_dir / "case_shape_encoder.safetensors"))
    enc = from_pretrained(golden_dir / "model_shape_enc_tiny")
    dec = from_pretrained(golden_dir / "model_tex_dec_tiny")
    coords = t["in.coords"]
    with torch.no_grad():
        z, hier = enc(SparseTensor(t["in.vertices"], coords), SparseTensor(t["in.intersected"], coords),
                      return_hierarchy=True)
        rebuilt = SparseHierarchy.from_coords(coords, 4)
        for a, b in zip(hier.maps, rebuilt.maps):
            assert torch.equal(a.coarse_coords, b.coarse_coords) and torch.equal(a.parent, b.parent)
        y = dec(z, hierarchy=hier)
    assert torch.equal(y.coords, coords)
    with pytest.raises(ValueError):
        dec(z)  # neither guide_subs nor hierarchy


def test_decoder_fp16_conversion_keeps_norms_fp32() -> None:
    args = dict(out_channels=6, model_channels=[16, 8], latent_channels=4, num_blocks=[1, 0],
                block_type=["SparseConvNeXtBlock3d"] * 2, up_block_type=["SparseResBlockC2S3d"],
                block_args=[{}, {}], use_fp16=True, pred_subdiv=True)
    dec = build_model("SparseUnetVaeDecoder", args, "meta")
    dt = {k: v.dtype for k, v in dec.state_dict().items()}
    assert dt["blocks.0.0.conv.weight"] == torch.float16 and dt["blocks.0.0.mlp.0.weight"] == torch.float16
    assert dt["blocks.0.0.norm.weight"] == torch.float32 and dt["from_latent.weight"] == torch.float32
    assert dec.dtype == torch.float16


@pytest.mark.parametrize("name", ["shape_encoder", "tex_decoder_guided", "tex_decoder_encoder_cache"])
def test_golden_case_pairs_algorithm(golden_dir: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-tap ``pairs`` conv reproduces the golden cases too (the default on one CPU thread)."""
    from backend.modules.sparse import conv_torch

    monkeypatch.setattr(conv_torch, "ALGORITHM", "pairs")
    report = run_case(golden_dir, name)
    assert report.passed, report.errors
