"""Checkpoint loading: official key sets on the meta device, strict checks, bad files."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backend.models import (MODEL_CLASSES, CheckpointError, apply_dtype, build_model, from_pretrained,
                            get_model_class, read_safetensors_header, resolve_checkpoint)

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official_state_dict"


def _summary(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "official_state_dict" / "_summary.json").read_text())


def _official_stems() -> list[str]:
    summary = json.loads((OFFICIAL / "_summary.json").read_text()) if OFFICIAL.is_dir() else {}
    return [s for s, e in summary.items() if "cls" in e and not s.startswith("dinov3")]


@pytest.mark.parametrize("stem", _official_stems())
def test_official_manifest_keys_and_shapes(shared_dir: Path, stem: str) -> None:
    """The class built from the official config on meta has exactly the file's keys and shapes."""
    entry = _summary(shared_dir)[stem]
    assert entry["cls"] in MODEL_CLASSES, f"{stem}: class {entry['cls']} is not registered"
    manifest = json.loads((shared_dir / "official_state_dict" / f"{stem}.json").read_text())
    model = build_model(entry["cls"], entry["args"], "meta")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v[0] for k, v in manifest.items()}
    assert sorted(set(want) - set(got)) == [], "missing in model"
    assert sorted(set(got) - set(want)) == [], "not in the official file"
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert bad == {}
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


@pytest.mark.parametrize("stem", _official_stems())
def test_official_runtime_dtypes(shared_dir: Path, stem: str) -> None:
    """With the official config (flows ``dtype: bfloat16``, VAEs ``use_fp16``) every parameter has
    the dtype of the official model object; the CPU rewrite makes everything fp32."""
    entry = _summary(shared_dir)[stem]
    runtime = json.loads((shared_dir / "official_state_dict" / "runtime_dtypes" / f"{stem}.json").read_text())
    model = build_model(entry["cls"], entry["args"], "meta")
    got = {k: str(v.dtype).removeprefix("torch.") for k, v in model.state_dict().items()}
    want = {k: v[1] for k, v in runtime.items() if k in got}
    assert got == want
    # non-file buffers of the official object (SS flow: rope_phases complex64 [4096, 64]) exist here
    # as non-persistent buffers with the same shape and dtype
    buffers = dict(model.named_buffers())
    for k in set(runtime) - set(got):
        assert k in buffers, k
        assert [list(buffers[k].shape), str(buffers[k].dtype).removeprefix("torch.")] == runtime[k]
    # on CPU the loader rewrites the precision to fp32 everywhere
    args32 = apply_dtype(get_model_class(entry["cls"]), entry["args"], torch.float32)
    m32 = build_model(entry["cls"], args32, "meta")
    assert {p.dtype for p in m32.parameters()} == {torch.float32}


# ------------------------------------------------------------------ tiny checkpoints in the official layout

TINY = {"resolution": 4, "in_channels": 4, "out_channels": 4, "model_channels": 64, "cond_channels": 32,
        "num_blocks": 1, "num_heads": 1, "mlp_ratio": 2.0, "pe_mode": "rope", "share_mod": True,
        "qk_rms_norm": True, "qk_rms_norm_cross": True, "dtype": "bfloat16"}


def _write_tiny(tmp_path: Path, name: str = "ck", file_dtype: torch.dtype = torch.bfloat16) -> tuple[Path, dict]:
    torch.manual_seed(0)
    model = build_model("SparseStructureFlowModel", {**TINY, "dtype": "float32"}, "cpu")
    sd = {k: (v.detach() + 0.01 * torch.randn_like(v)).to(file_dtype).contiguous()
          for k, v in model.state_dict().items()}
    stem = tmp_path / name
    (tmp_path / f"{name}.json").write_text(json.dumps({"name": "SparseStructureFlowModel", "args": TINY}))
    save_file(sd, str(tmp_path / f"{name}.safetensors"))
    return stem, sd


def test_roundtrip_fp32_on_cpu(tmp_path: Path) -> None:
    stem, sd = _write_tiny(tmp_path)
    model = from_pretrained(stem)
    assert not model.training
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k  # bf16 -> fp32 is exact
    assert model.rope_phases.dtype == torch.complex64 and not model.rope_phases.is_meta
    x = torch.randn(1, 4, 4, 4, 4)
    y = model(x, torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert y.shape == x.shape and torch.isfinite(y).all()
    # the same pair given as file names or as the folder
    for p in (f"{stem}.json", f"{stem}.safetensors", tmp_path):
        assert torch.equal(from_pretrained(p).input_layer.weight, model.input_layer.weight)


def test_explicit_bf16_keeps_official_mixed_precision(tmp_path: Path) -> None:
    stem, _ = _write_tiny(tmp_path, file_dtype=torch.float16)
    model = from_pretrained(stem, dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.t_embedder.mlp[0].weight.dtype == torch.float32
    y = model(torch.randn(2, 4, 4, 4, 4), torch.tensor([10.0, 900.0]), torch.randn(2, 5, 32))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def _rewrite(path: Path, sd: dict) -> None:
    path.unlink()
    save_file(sd, str(path))


def test_missing_key(tmp_path: Path) -> None:
    stem, sd = _write_tiny(tmp_path)
    del sd["blocks.0.modulation"]
    _rewrite(Path(f"{stem}.safetensors"), sd)
    with pytest.raises(CheckpointError) as ei:
        from_pretrained(stem)
    msg = str(ei.value)
    assert "ck.safetensors" in msg and "missing keys: blocks.0.modulation" in msg
    assert ei.value.missing == ["blocks.0.modulation"] and not ei.value.unexpected


def test_renamed_key(tmp_path: Path) -> None:
    stem, sd = _write_tiny(tmp_path)
    sd["blocks.0.self_attn.to_qkv.weights"] = sd.pop("blocks.0.self_attn.to_qkv.weight")
    _rewrite(Path(f"{stem}.safetensors"), sd)
    with pytest.raises(CheckpointError) as ei:
        from_pretrained(stem)
    assert ei.value.missing == ["blocks.0.self_attn.to_qkv.weight"]
    assert ei.value.unexpected == ["blocks.0.self_attn.to_qkv.weights"]
    assert "unexpected keys: blocks.0.self_attn.to_qkv.weights" in str(ei.value)


def test_wrong_shape(tmp_path: Path) -> None:
    stem, sd = _write_tiny(tmp_path)
    sd["out_layer.weight"] = sd["out_layer.weight"][:3].contiguous()
    _rewrite(Path(f"{stem}.safetensors"), sd)
    with pytest.raises(CheckpointError) as ei:
        from_pretrained(stem)
    assert ei.value.mismatched == {"out_layer.weight": ((3, 64), (4, 64))}
    assert "out_layer.weight (file [3, 64] vs model [4, 64])" in str(ei.value)
    assert str(Path(f"{stem}.safetensors")) in str(ei.value)


def test_truncated_file(tmp_path: Path) -> None:
    stem, _ = _write_tiny(tmp_path)
    f = Path(f"{stem}.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as ei:
        from_pretrained(stem)
    assert ei.value.path == str(f)
    f.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(stem)
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        from_pretrained(stem)


class _Trap:
    """Unpickling this touches a marker file: proves that nothing was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_renamed_safetensors_is_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stem, _ = _write_tiny(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("the loader must never unpickle")

    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(mod, name, forbidden)
    f = Path(f"{stem}.safetensors")
    marker = tmp_path / "EXECUTED"
    f.write_bytes(pickle.dumps({"input_layer.weight": _Trap(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle") as ei:
        from_pretrained(stem)
    assert str(f) in str(ei.value)
    # torch.save's zip format
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Trap(marker)))
    with pytest.raises(CheckpointError, match="zip"):
        from_pretrained(stem)
    # garbage that is neither
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        from_pretrained(stem)
    assert not marker.exists()


def test_bad_config_and_paths(tmp_path: Path) -> None:
    stem, _ = _write_tiny(tmp_path)
    Path(f"{stem}.json").write_text(json.dumps({"name": "NoSuchModel", "args": {}}))
    with pytest.raises(CheckpointError, match="unknown model class 'NoSuchModel'"):
        from_pretrained(stem)
    Path(f"{stem}.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read checkpoint config"):
        from_pretrained(stem)
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="exactly one"):
        resolve_checkpoint(tmp_path)


def test_header_reader(tmp_path: Path) -> None:
    f = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(2, 3, dtype=torch.bfloat16), "i": torch.zeros(4, dtype=torch.int32)}, str(f))
    assert read_safetensors_header(f) == {"w": ((2, 3), "BF16"), "i": ((4,), "I32")}


def test_header_length_with_a_pickle_like_first_byte_is_still_safetensors(tmp_path: Path) -> None:
    """A header length whose low byte is 0x80 (1 file in 256) must not be mistaken for a pickle."""
    import struct

    from safetensors.torch import save_file

    from backend.models import read_safetensors_header

    path = tmp_path / "m.safetensors"
    for pad in range(400):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n & 0xFF == 0x80
    assert read_safetensors_header(path) == {"w": ((2,), "F32")}
