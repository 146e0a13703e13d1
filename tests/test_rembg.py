"""Background removal: our BiRefNet against the upstream golden data, strict HF-layout loading, the
pure-torch deformable conv, the TRELLIS.2 wrapper semantics, the background policy and the end-to-end
paths (pipeline, CLI, server) on tiny checkpoints with a cluttered photo-like background."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.errors import BadInput, Cancelled, MissingWeights
from backend.golden.birefnet_cases import build_recipe_model, run_birefnet_case
from backend.models import CheckpointError, read_safetensors_header
from backend.models.birefnet import (UNUSED_KEYS, BiRefNet, config_from_shapes, load_birefnet, recipe_weights,
                                     write_birefnet_file, write_tiny_birefnet)
from backend.modules.deform_conv import modulated_deform_conv2d, torchvision_deform_conv2d
from backend.pipelines.preprocess import key_plain_background, preprocess_with_info
from backend.pipelines.rembg import BiRefNetRemover


@pytest.fixture(scope="module")
def birefnet_gold(shared_dir: Path) -> Path:
    return shared_dir / "golden_birefnet"


# --------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", ["B", "A"])
def test_golden_model_cases_logits_and_intermediates(birefnet_gold, case):
    rep = run_birefnet_case(birefnet_gold, case)
    assert rep.passed, rep.errors
    meta = json.loads((birefnet_gold / f"case_{case}.json").read_text())
    compared = set(rep.max_abs)
    expected = {k for k in meta["tensors"] if not k.endswith(".input") and not k.endswith("@f64")}
    assert compared == expected and len(compared) > 100       # logits and every stored intermediate
    assert rep.max_abs["in256x256.logits"] < 5e-5


def test_golden_wrapper_case_c_preprocessing(birefnet_gold):
    """Case C's image-side steps (the 1024² Swin-L run itself takes ~1.5 min: `python -m backend.golden`)."""
    from safetensors.torch import load_file

    gold = load_file(str(birefnet_gold / "case_C.safetensors"))
    img = Image.open(birefnet_gold / "case_C_input.png")
    remover = BiRefNetRemover(torch.nn.Conv2d(3, 1, 1))     # only the wrapper's steps are used here
    resized = remover.resized_rgb(img)
    assert np.array_equal(resized, gold["resized_rgb_u8"].numpy())           # PIL BILINEAR squash, exact
    x = remover.model_input(resized)
    assert torch.allclose(x[:, :, :64, :64], gold["model_input@corner64"], atol=1e-6, rtol=0)
    m1024 = remover.mask_from_logits(gold["logits"])
    d = np.abs(m1024.astype(int) - gold["mask_1024_u8"].numpy().astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-4                            # truncation, not rounding
    back = np.asarray(remover.mask_to_size(gold["mask_1024_u8"].numpy(), img.size))
    assert np.array_equal(back, gold["mask_u8"].numpy())                      # BICUBIC back to the input size


# ------------------------------------------------------------------------------------------- loading


def _manifest(birefnet_gold: Path, bb: str) -> list[dict]:
    return json.loads((birefnet_gold / f"manifest_{bb}.json").read_text())["tensors"]


def test_strict_load_of_a_file_in_the_hf_layout(birefnet_gold, tmp_path):
    """All manifest keys saved as F16 + I64 (the 12 training-only tensors included) load strictly."""
    from safetensors.torch import save_file

    man = _manifest(birefnet_gold, "swin_v1_t")
    w = recipe_weights(man)
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in w.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    header = read_safetensors_header(tmp_path / "model.safetensors")
    assert {dt for _, dt in header.values()} == {"F16", "I64"} and len(header) == len(man) == 586
    assert set(UNUSED_KEYS) <= set(header) and len(UNUSED_KEYS) == 12
    model = load_birefnet(tmp_path)
    assert model.config.embed_dim == 96 and model.config.depths == (2, 2, 6, 2) and model.config.window_size == 7
    sd = model.state_dict()
    assert set(sd) == set(w) - set(UNUSED_KEYS)
    for k in ("bb.layers.2.blocks.5.attn.qkv.weight", "decoder.decoder_block1.dec_att.bn1.running_var"):
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], w[k].half().float())   # F16 -> fp32
    assert torch.equal(sd["bb.layers.0.blocks.1.attn.relative_position_index"],
                       w["bb.layers.0.blocks.1.attn.relative_position_index"])
    # a config.json naming another backbone is refused
    (tmp_path / "config.json").write_text(json.dumps({"bb": "swin_v1_l"}))
    with pytest.raises(CheckpointError, match="does not match"):
        load_birefnet(tmp_path)


def test_released_swin_l_config_is_read_from_the_shapes(birefnet_gold):
    man = _manifest(birefnet_gold, "swin_v1_l")
    cfg = config_from_shapes({t["name"]: tuple(t["shape"]) for t in man})
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size) == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    assert cfg.lateral_channels == [3072, 1536, 768, 384]
    with torch.device("meta"):
        model = BiRefNet(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {t["name"]: tuple(t["shape"]) for t in man if t["name"] not in UNUSED_KEYS}
    assert shapes == want and sum(math.prod(s) for s in want.values()) > 220e6


@pytest.fixture(scope="module")
def tiny_rembg(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("birefnet")
    write_tiny_birefnet(folder, seed=0)
    return folder


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_wrong_missing_or_misshaped_keys_are_named(tiny_rembg, tmp_path):
    k = "decoder.lateral_block3.conv.weight"
    with pytest.raises(CheckpointError) as ei:
        load_birefnet(_rewrite(tiny_rembg, tmp_path / "a", lambda sd: sd.__setitem__("decoder.extra.weight",
                                                                                       torch.zeros(1))))
    assert ei.value.unexpected == ["decoder.extra.weight"], str(ei.value)
    with pytest.raises(CheckpointError) as ei:
        load_birefnet(_rewrite(tiny_rembg, tmp_path / "b", lambda sd: sd.pop(k)))
    assert ei.value.missing == [k] and k in str(ei.value)
    with pytest.raises(CheckpointError) as ei:
        load_birefnet(_rewrite(tiny_rembg, tmp_path / "c", lambda sd: sd.__setitem__(k, sd[k][:, :-1].contiguous())))
    assert list(ei.value.mismatched) == [k]
    # the training-only tensors may be absent (nothing else may)
    model = load_birefnet(_rewrite(tiny_rembg, tmp_path / "d", lambda sd: [sd.pop(u) for u in UNUSED_KEYS]))
    assert isinstance(model, BiRefNet)
    with pytest.raises(MissingWeights, match="Background removal"):
        BiRefNetRemover.from_folder(tmp_path / "empty")


# ------------------------------------------------------------------------------------- deform conv


def _deform_reference(x, offset, mask, weight, pad):
    """Direct float64 DCNv2 (bilinear with zero outside, torchvision's rule), written independently."""
    x, offset, mask, weight = (t.double() for t in (x, offset, mask, weight))
    n, c, h, w = x.shape
    o, _, k, _ = weight.shape
    ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    out = torch.zeros(n, o, ho, wo, dtype=torch.float64)
    oy, ox = torch.meshgrid(torch.arange(ho, dtype=torch.float64), torch.arange(wo, dtype=torch.float64),
                            indexing="ij")
    flat = x.reshape(n, c, h * w)
    for i in range(k):
        for j in range(k):
            t = i * k + j
            py = oy - pad + i + offset[:, 2 * t]
            px = ox - pad + j + offset[:, 2 * t + 1]
            y0, x0 = torch.floor(py), torch.floor(px)
            val = torch.zeros(n, c, ho, wo, dtype=torch.float64)
            for dy in (0, 1):
                for dx in (0, 1):
                    yy, xx = y0 + dy, x0 + dx
                    wgt = (1 - (py - yy).abs()) * (1 - (px - xx).abs())
                    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                    idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().view(n, 1, -1).expand(n, c, -1)
                    v = torch.gather(flat, 2, idx).view(n, c, ho, wo)
                    val += v * (wgt * ok).unsqueeze(1)
            val = val * mask[:, t].unsqueeze(1)
            out += torch.einsum("nchw,oc->nohw", val, weight[:, :, i, j])
    return out


@pytest.mark.parametrize("k,pad,h,w", [(3, 1, 9, 7), (7, 3, 12, 10), (1, 0, 5, 6), (3, 1, 1, 6)])
def test_deform_conv_matches_a_direct_reference(k, pad, h, w):
    g = torch.Generator().manual_seed(k * 100 + h)
    x = torch.randn(2, 4, h, w, generator=g)
    offset = 2.5 * torch.randn(2, 2 * k * k, h, w, generator=g)   # samples between pixels and past the border
    mask = 2 * torch.sigmoid(torch.randn(2, k * k, h, w, generator=g))
    weight = torch.randn(5, 4, k, k, generator=g)
    bias = torch.randn(5, generator=g)
    ref = _deform_reference(x, offset, mask, weight, pad) + bias.double().view(1, -1, 1, 1)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, pad, impl="torch")
    assert (got.double() - ref).abs().max() < 2e-5
    # zero offsets + unit mask = a plain convolution
    plain = modulated_deform_conv2d(x, torch.zeros_like(offset), torch.ones_like(mask), weight, None, pad,
                                    impl="torch")
    assert torch.allclose(plain, torch.nn.functional.conv2d(x, weight, padding=pad), atol=2e-5)


def test_deform_conv_chunking_is_exact(monkeypatch):
    import backend.modules.deform_conv as dc

    g = torch.Generator().manual_seed(3)
    x, off = torch.randn(1, 8, 16, 16, generator=g), torch.randn(1, 98, 16, 16, generator=g)
    mask, wt = torch.rand(1, 49, 16, 16, generator=g), torch.randn(6, 8, 7, 7, generator=g)
    whole = dc.modulated_deform_conv2d(x, off, mask, wt, None, 3, impl="torch")
    monkeypatch.setattr(dc, "_CHUNK_ELEMENTS", 8 * 16 * 16 * 5)          # 5 taps per chunk
    assert torch.allclose(dc.modulated_deform_conv2d(x, off, mask, wt, None, 3, impl="torch"), whole, atol=1e-5)


@pytest.mark.skipif(torchvision_deform_conv2d() is None, reason="torchvision's compiled deform_conv2d is not "
                                                                "importable with this torch build")
def test_deform_conv_torch_path_equals_torchvision():
    g = torch.Generator().manual_seed(5)
    x, off = torch.randn(2, 6, 11, 13, generator=g), 2 * torch.randn(2, 18, 11, 13, generator=g)
    mask, wt = torch.rand(2, 9, 11, 13, generator=g) * 2, torch.randn(4, 6, 3, 3, generator=g)
    a = modulated_deform_conv2d(x, off, mask, wt, None, 1, impl="torch")
    b = modulated_deform_conv2d(x, off, mask, wt, None, 1, impl="torchvision")
    assert torch.allclose(a, b, atol=1e-5)


# -------------------------------------------------------------------------------------- policy + e2e


def cluttered_photo(shared_dir: Path, size: int = 320) -> np.ndarray:
    """An RGB 'photo': the TRELLIS.2 example object (MIT) over a textured, cluttered background made from
    Spot's texture (public domain, Keenan Crane) plus coloured boxes; no alpha, no plain border."""
    obj = Image.open(next((shared_dir / "assets/images/trellis2_example_image").glob("0a34*.webp"))).convert("RGBA")
    bg = Image.open(shared_dir / "assets/meshes/spot/spot_texture.png").convert("RGB").resize((size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.stack([np.sin(xx / 7.0), np.sin((xx + yy) / 11.0), np.cos(yy / 5.0)], -1)
    rng = np.random.default_rng(7)
    arr = np.asarray(bg) * (0.65 + 0.35 * stripes) + rng.normal(0, 18, (size, size, 3))
    for _ in range(40):
        y, x = rng.integers(-20, size - 10, 2)
        arr[max(y, 0):y + rng.integers(8, 48), max(x, 0):x + rng.integers(8, 48)] = rng.integers(0, 255, 3)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(arr).convert("RGBA")
    o = obj.resize((int(size * 0.6), int(size * 0.6 * obj.height / obj.width)))
    canvas.alpha_composite(o, ((size - o.width) // 2, (size - o.height) // 2))
    return np.asarray(canvas.convert("RGB"))


def test_background_policy(tiny_rembg, shared_dir):
    photo = cluttered_photo(shared_dir)
    assert key_plain_background(photo) is None                     # the keyer alone cannot cut it out
    with pytest.raises(BadInput, match="no transparency") as ei:
        preprocess_with_info(photo)
    assert "--rembg-model" in str(ei.value)
    remover = BiRefNetRemover.from_folder(tiny_rembg)
    img, info = preprocess_with_info(photo, remover)
    assert info["background"] == "model" and img.width == img.height and 0.05 < info["coverage"] < 0.95
    mask = np.asarray(remover(Image.fromarray(photo)))
    ys, xs = np.nonzero(mask > 0.8 * 255)
    assert img.width == 2 * (max(xs.max() - xs.min(), ys.max() - ys.min()) // 2)   # cropped where the model says
    img_k, info_k = preprocess_with_info(photo, remover, "keep")
    assert info_k["background"] == "none" and img_k.width == 2 * ((photo.shape[1] - 1) // 2)   # whole frame
    rgba = np.dstack([photo, np.where(mask > 128, 255, 0).astype(np.uint8)])
    _, info_a = preprocess_with_info(Image.fromarray(rgba, "RGBA"), remover)
    assert info_a["background"] == "alpha"                          # real alpha wins in auto
    _, info_r = preprocess_with_info(Image.fromarray(rgba, "RGBA"), remover, "remove")
    assert info_r["background"] == "model"
    plain = np.full((64, 64, 3), 240, np.uint8)
    plain[20:44, 16:48] = (30, 90, 200)
    _, info_p = preprocess_with_info(plain)
    assert info_p["background"] == "keyer" and "No background-removal model" in info_p["note"]
    with pytest.raises(BadInput, match="No object found"):
        preprocess_with_info(photo, lambda im: Image.new("L", im.size, 40))
    with pytest.raises(BadInput, match="background must be"):
        preprocess_with_info(photo, remover, "erase")


def test_generate_from_a_photo_with_the_tiny_remover(tiny_dir, shared_dir, tmp_path):
    from backend.pipelines import load_pipeline

    photo = cluttered_photo(shared_dir)
    fast = {k: {"steps": 2} for k in ("sparse_structure", "shape_slat", "tex_slat")}
    plain = load_pipeline(tiny_dir, device="cpu")
    with pytest.raises(BadInput, match="Background removal"):     # keyer only: refused before any model runs
        plain.generate(photo, "512", seed=1, stage_params=fast)
    pipe = load_pipeline(tiny_dir, device="cpu", rembg_dir=tiny_dir / "birefnet")
    stages = []
    res = pipe.generate(photo, "512", seed=1, stage_params=fast, progress=lambda s, *a: stages.append(s))
    assert res.preprocess_info["background"] == "model" and stages[0] == "preprocess"
    assert len(res.faces) > 0 and len(res.vertices) > 0
    expect, _ = preprocess_with_info(photo, BiRefNetRemover.from_folder(tiny_dir / "birefnet"))
    assert np.array_equal(res.state.image, np.asarray(expect))      # the model saw the BiRefNet cut-out
    # cancel between preprocessing and the flows
    import threading

    ev = threading.Event()

    def cancel_after_preprocess(stage, step, total, elapsed):
        if stage == "preprocess" and step == total:
            ev.set()

    with pytest.raises(Cancelled):
        pipe.generate(photo, "512", seed=1, stage_params=fast, progress=cancel_after_preprocess, cancel=ev)
    with pytest.raises(MissingWeights, match="model.safetensors"):
        load_pipeline(tiny_dir, device="cpu", rembg_dir=tmp_path / "nowhere")


def test_cli_background_flags(tiny_dir, shared_dir, tmp_path, capsys):
    from backend.cli import main

    src = tmp_path / "photo.jpg"
    Image.fromarray(cluttered_photo(shared_dir)).save(src, quality=92)
    base = ["generate", str(src), "--model", str(tiny_dir), "--pipeline", "512", "--device", "cpu", "-q",
            "--texture-size", "32", "--sparse-structure-steps", "2", "--shape-slat-steps", "2", "--tex-slat-steps", "2"]
    assert main(base + ["-o", str(tmp_path / "never.glb")]) == 1
    err = capsys.readouterr().err
    assert "Background removal" in err and "Traceback" not in err and not (tmp_path / "never.glb").exists()
    out = tmp_path / "o.glb"
    assert main(base + ["-o", str(out), "--rembg-model", str(tiny_dir / "birefnet")]) == 0 and out.is_file()
    assert "cut-out: the background-removal model" in capsys.readouterr().err
    assert main(base + ["-o", str(tmp_path / "k.glb"), "--background", "keep"]) == 0


def test_recipe_model_is_deterministic(birefnet_gold):
    a = build_recipe_model(birefnet_gold / "manifest_swin_v1_t.json")
    b = build_recipe_model(birefnet_gold / "manifest_swin_v1_t.json")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_tiny_file_layout(tiny_rembg):
    header = read_safetensors_header(tiny_rembg / "model.safetensors")
    assert {dt for _, dt in header.values()} == {"F16", "I64"} and set(UNUSED_KEYS) <= set(header)
    cfg = json.loads((tiny_rembg / "config.json").read_text())
    assert cfg["trellis2_config"]["embed_dim"] == 16
    model = load_birefnet(tiny_rembg)
    path = write_birefnet_file(model, tiny_rembg.parent / "again", with_unused=False)
    assert set(read_safetensors_header(path)) == set(header) - set(UNUSED_KEYS)


def test_device_dtype_policy_and_low_vram_wiring(tiny_dir, shared_dir, monkeypatch):
    """fp32 on CPU; fp16/bf16 on GPUs per the precision setting; the model is borrowed through the model
    manager's ``use`` (which parks it back on the CPU in low-VRAM mode before the flows load)."""
    import contextlib

    from backend.pipelines import load_pipeline
    from backend.pipelines.loader import REMBG_KEY
    from backend.pipelines.rembg import remover_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert remover_dtype("auto", cpu) == remover_dtype("bf16", cpu) == torch.float32
    assert remover_dtype("auto", cuda) == remover_dtype("fp16", cuda) == torch.float16
    assert remover_dtype("bf16", cuda) == torch.bfloat16 and remover_dtype("fp32", cuda) == torch.float32
    pipe = load_pipeline(tiny_dir, device="cpu", rembg_dir=tiny_dir / "birefnet")
    used = []
    real_use = pipe.models.use

    @contextlib.contextmanager
    def spy(key):
        used.append(key)
        with real_use(key) as m:
            yield m

    monkeypatch.setattr(pipe.models, "use", spy)
    _, info = pipe.cut_out(cluttered_photo(shared_dir))
    assert info["background"] == "model" and used == [REMBG_KEY]
    assert next(pipe.models.get(REMBG_KEY).parameters()).dtype == torch.float32


def test_damaged_or_foreign_remover_weights_are_missing_weights(tiny_dir, shared_dir, tmp_path):
    """A truncated or mismatched BiRefNet file fails as missing_weights naming the file / keys, at first use."""
    import shutil

    from backend.pipelines import load_pipeline

    photo = cluttered_photo(shared_dir)
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_dir / "birefnet", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    pipe = load_pipeline(tiny_dir, device="cpu", rembg_dir=bad)
    with pytest.raises(MissingWeights, match="truncated") as ei:
        pipe.cut_out(photo)
    assert str(bad / "model.safetensors") in ei.value.missing
    foreign = _rewrite(tiny_dir / "birefnet", tmp_path / "foreign",
                       lambda sd: sd.pop("decoder.gdt_convs_attn_3.0.weight"))
    with pytest.raises(MissingWeights, match="gdt_convs_attn_3.0.weight"):
        load_pipeline(tiny_dir, device="cpu", rembg_dir=foreign).cut_out(photo)
