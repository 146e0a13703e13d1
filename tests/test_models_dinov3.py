"""DINOv3 ViT: official key names, and equality with transformers' DINOv3ViTModel (tiny random)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from backend.models import CheckpointError
from backend.modules.image_feature_extractor import (DINOv3ViTConfig, DINOv3ViTModel, DinoV3FeatureExtractor,
                                                     load_dinov3)

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            num_register_tokens=4, patch_size=16, layer_norm_eps=1e-5, rope_theta=100.0,
            query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)


def test_vitl16_keys_and_shapes_match_official_manifest(shared_dir: Path) -> None:
    manifest = json.loads((shared_dir / "official_state_dict" / "dinov3_vitl16_pretrain_lvd1689m.json").read_text())
    with torch.device("meta"):
        model = DINOv3ViTModel()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: v[0] for k, v in manifest.items()}
    assert sum(p.numel() for p in model.parameters()) == 303_129_600


def _random_tiny_checkpoint(tmp_path: Path, prefix: str = "") -> tuple[Path, dict]:
    torch.manual_seed(1)
    with torch.device("meta"):
        m = DINOv3ViTModel(DINOv3ViTConfig(**TINY))
    sd = {prefix + k if k.startswith("layer.") else k: torch.randn(v.shape) * (0.3 if v.dim() > 1 else 0.5)
          + (1.0 if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
          for k, v in m.state_dict().items()}
    folder = tmp_path / "dino"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", **TINY}))
    return folder, sd


def test_matches_transformers_dinov3(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", minversion="4.56")
    folder, sd = _random_tiny_checkpoint(tmp_path)
    ref = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY)).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k]
    ours = load_dinov3(folder)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 48)  # non-square: 4×3 patches
    with torch.no_grad():
        # TRELLIS.2's access pattern: embeddings -> rope -> every layer -> parameter-free LN
        h = ref.embeddings(x, bool_masked_pos=None)
        pe = ref.rope_embeddings(x)
        for layer in ref.layer:
            h = layer(h, position_embeddings=pe)
        want = F.layer_norm(h, h.shape[-1:])
        got = DinoV3FeatureExtractor(ours).extract_features(x)
        assert got.shape == (2, 1 + 4 + 12, 64)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref(pixel_values=x).last_hidden_state, atol=2e-5, rtol=1e-5)


def test_transformers5_key_names_and_strictness(tmp_path: Path) -> None:
    folder, sd = _random_tiny_checkpoint(tmp_path, prefix="model.")
    ours = load_dinov3(folder)
    k = "model.layer.1.attention.q_proj.weight"
    assert torch.equal(ours.state_dict()["layer.1.attention.q_proj.weight"], sd[k])
    del sd[k]
    (folder / "model.safetensors").unlink()
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer.1.attention.q_proj.weight"):
        load_dinov3(folder)


def test_feature_extractor_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    folder, _ = _random_tiny_checkpoint(tmp_path)
    fx = DinoV3FeatureExtractor.from_pretrained(folder, image_size=64)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (80, 70, 4), dtype=np.uint8), "RGBA")
    x = fx.preprocess([img])
    resized = np.asarray(img.resize((64, 64), Image.LANCZOS).convert("RGB"), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (resized - mean) / std, atol=1e-5)
    feats = fx([img])
    assert feats.shape == (1, 1 + 4 + 16, 64)
    # parameter-free LayerNorm output: zero mean, unit variance per token
    torch.testing.assert_close(feats.mean(-1), torch.zeros(1, 21), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(-1, unbiased=False), torch.ones(1, 21), atol=1e-3, rtol=0)
