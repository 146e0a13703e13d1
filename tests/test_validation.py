"""The request validation layer (backend/validation.py), image intake (backend/intake.py), image
loading guards (EXIF, 16-bit, bombs) and model-folder path confinement: torch-free, milliseconds."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from backend import intake, validation as V
from backend.errors import BadInput


# ------------------------------------------------------------------------------------- requests

@pytest.mark.parametrize("kind,field,value", [
    ("generate", "seed", "7"),
    ("generate", "seed", 1 << 64),
    ("generate", "seed", -1),
    ("generate", "seed", True),
    ("generate", "seed", 3.0),
    ("generate", "stage_params", [1, 2]),
    ("generate", "stage_params", {"shape_slat": 5}),
    ("generate", "stage_params", {"bogus_stage": {}}),
    ("generate", "stage_params", {"shape_slat": {"stepz": 3}}),
    ("generate", "stage_params", {"shape_slat": {"steps": "12"}}),
    ("generate", "stage_params", {"shape_slat": {"steps": 0}}),
    ("generate", "stage_params", {"tex_slat": {"guidance_strength": math.nan}}),
    ("generate", "stage_params", {"tex_slat": {"guidance_strength": math.inf}}),
    ("generate", "stage_params", {"tex_slat": {"guidance_interval": [0.8, 0.2]}}),
    ("generate", "max_tokens", "many"),
    ("generate", "max_tokens", 100),
    ("generate", "texture_size", 0),
    ("generate", "texture_size", 3),
    ("generate", "texture_size", 65536),
    ("generate", "pipeline_type", "2048"),
    ("generate", "precision", "int8"),
    ("generate", "device", "gpu; rm -rf"),
    ("generate", "background", "transparent"),
    ("generate", "remove_background", "yes"),
    ("generate", "image", ""),
    ("generate", "output", "fbx"),
    ("generate", "decimation_target", -5),
    ("upscale", "source_job", "../etc"),
    ("upscale", "source_job", 12),
    ("texture", "resolution", 1000),
    ("texture", "texture_size", 8193),
])
def test_every_bad_field_is_bad_input_naming_the_field(kind, field, value):
    msg = {"type": kind, "job": "j1", "source_job": "src", field: value}
    with pytest.raises(BadInput) as info:
        V.validate_request(msg)
    assert info.value.field is not None and info.value.field.startswith(field), info.value.field
    assert f"'{info.value.field}'" in info.value.message


def test_good_requests_are_normalised_and_unknown_fields_pass_through():
    msg = {"type": "generate", "job": "j", "seed": (1 << 64) - 1, "precision": "FP32", "device": "CUDA:1",
           "background": "Remove", "texture_size": 1024, "max_tokens": 0, "pipeline_type": "512",
           "stage_params": {"shape_slat": {"steps": 3, "guidance_strength": 7, "guidance_interval": [0.1, 0.9]},
                            "tex_slat": None},
           "output": "textures", "decimation_target": 0, "steps": 4, "step_s": 0.1}
    out = V.validate_request(msg)
    assert out["precision"] == "fp32" and out["device"] == "cuda:1" and out["background"] == "remove"
    assert out["stage_params"] == {"shape_slat": {"steps": 3, "guidance_strength": 7.0,
                                                  "guidance_interval": [0.1, 0.9]}}
    assert out["steps"] == 4 and out["step_s"] == 0.1 and out["seed"] == (1 << 64) - 1
    assert msg["precision"] == "FP32"                           # the input is not modified
    assert V.validate_request({"type": "upscale", "job": "u"}, partial=True)["type"] == "upscale"
    with pytest.raises(BadInput, match="source_job"):
        V.validate_request({"type": "upscale", "job": "u"})
    with pytest.raises(BadInput, match="job type"):
        V.validate_request({"type": "bake", "job": "u"})


def test_texture_arrays_are_checked():
    ok = {"vertices": np.zeros((3, 3), np.float32), "faces": np.zeros((1, 3), np.int32),
          "uvs": np.zeros((3, 2), np.float32), "matrix": np.eye(4, dtype=np.float32)}
    V.validate_request({"type": "texture", "job": "t", "arrays": ok})
    for name, bad in [("vertices", np.zeros((3, 2), np.float32)), ("faces", np.zeros((1, 3), np.float32)),
                      ("uvs", np.zeros((3, 3), np.float32)), ("matrix", np.eye(3, dtype=np.float32))]:
        with pytest.raises(BadInput) as info:
            V.validate_request({"type": "texture", "job": "t", "arrays": {**ok, name: bad}})
        assert info.value.field == f"arrays.{name}"


def test_output_path_checks(tmp_path):
    assert V.check_output_path(tmp_path / "new" / "o.glb") == (tmp_path / "new" / "o.glb")
    with pytest.raises(BadInput, match="is a folder"):
        V.check_output_path(tmp_path)
    with pytest.raises(BadInput, match="must end in"):
        V.check_output_path(tmp_path / "o.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInput, match="not a folder"):
        V.check_output_path(tmp_path / "file" / "o.glb")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(BadInput, match="not writable"):
                V.check_output_path(ro / "o.glb")
        finally:
            ro.chmod(0o700)


def test_model_paths_are_confined_to_the_folder(tmp_path):
    root = tmp_path / "model"
    (root / "ckpts").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert V.confined_path(root, "ckpts/a", "models.a") == root / "ckpts" / "a"
    for rel in ("../outside", "ckpts/../../outside", "/etc/passwd", 7, ""):
        with pytest.raises(BadInput) as info:
            V.confined_path(root, rel, "models.a", (".json", ".safetensors"))
        assert info.value.field == "models.a"
    os.symlink(tmp_path / "outside.safetensors", root / "ckpts" / "evil.safetensors")
    with pytest.raises(BadInput, match="outside the model folder"):
        V.confined_path(root, "ckpts/evil", "models.evil", (".json", ".safetensors"))
    # a Hugging Face snapshot may link into its own repository's blob store
    repo = tmp_path / "models--microsoft--TRELLIS.2-4B"
    snap = repo / "snapshots" / "abc"
    (snap / "ckpts").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "123").write_bytes(b"w")
    os.symlink(repo / "blobs" / "123", snap / "ckpts" / "m.safetensors")
    assert V.confined_path(snap, "ckpts/m", "models.m", (".safetensors",)) == snap / "ckpts" / "m"


# ------------------------------------------------------------------------------------- images

def _png(arr, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_non_images_are_refused_before_anything_is_read_into_a_job(tmp_path):
    for src in ("/proc/self/environ", "/dev/zero"):
        if os.path.exists(src):
            with pytest.raises(BadInput) as info:
                intake.read_image_source(src)
            assert info.value.field == "image"
    txt = tmp_path / "secret.png"
    txt.write_text("HF_TOKEN=hf_abc\n")
    with pytest.raises(BadInput, match="not an image"):
        intake.read_image_source(txt)
    with pytest.raises(BadInput, match="not found"):
        intake.read_image_source(tmp_path / "missing.png")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="not a regular"):
        intake.read_image_source(fifo)                       # no hang on a FIFO
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(BadInput, match="MiB"):
        intake.read_image_source(big, limit=100)


def test_decompression_bomb_is_refused_before_decoding():
    # a 60-byte PNG whose header claims 30000 x 30000 RGBA pixels (would decode to 3.6 GB)
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    with pytest.raises(BadInput, match="decompression-bomb"):
        intake.validated_png(data)


def test_16bit_greyscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    out = Image.open(io.BytesIO(intake.validated_png(_png(ramp))))
    a = np.asarray(out)
    assert out.mode == "L" and a.min() == 0 and a.max() == 255
    assert abs(float(a.mean()) - 127.5) < 2                    # was ~254 (everything clipped to white)
    np.testing.assert_allclose(a, ramp / 257.0, atol=1)


def test_exif_orientation_is_applied_to_jpegs():
    """A phone JPEG: pixels stored landscape with orientation 6 (rotate 90° clockwise to view)."""
    from backend.pipelines.preprocess import load_image

    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)                               # left half red, right half blue
    stored[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    img = load_image(buf.getvalue())
    a = np.asarray(img.convert("RGB")).astype(int)
    assert img.size == (40, 80)                                # upright: portrait
    assert a[5, 20, 0] > 200 and a[5, 20, 2] < 60              # the stored left (red) is now the top
    assert a[75, 20, 2] > 200 and a[75, 20, 0] < 60
    png = Image.open(io.BytesIO(intake.validated_png(buf.getvalue())))
    assert png.size == (40, 80) and png.format == "PNG"


def test_validated_png_keeps_alpha_and_pixels():
    rgba = np.random.default_rng(0).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    out = Image.open(io.BytesIO(intake.validated_png(_png(rgba))))
    assert out.mode == "RGBA" and np.array_equal(np.asarray(out), rgba)
    with pytest.raises(BadInput):
        intake.validated_png(b"\x89PNG\r\n\x1a\n truncated")
    assert intake.sniff_image(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP" and intake.sniff_image(b"RIFF\0\0\0\0AVI ") is None


# ------------------------------------------------------------------------------------- model folder

def test_malformed_pipeline_json_is_bad_input_naming_the_file(tmp_path):
    from backend.pipelines.loader import PipelineConfig
    from backend.pipelines.tiny import write_tiny_pipeline

    root = write_tiny_pipeline(tmp_path / "tiny", seed=0)
    cfg = json.loads((root / "pipeline.json").read_text())
    for mutate, needle in [
        (lambda c: c["args"].__setitem__("models", ["a"]), "models"),
        (lambda c: c["args"]["models"].__setitem__("shape_slat_decoder", 5), "models.shape_slat_decoder"),
        (lambda c: c["args"]["models"].__setitem__("shape_slat_decoder", "../../evil"), "outside"),
        (lambda c: c["args"].__setitem__("resolution_scale", "big"), "resolution_scale"),
        (lambda c: c["args"].__setitem__("shape_slat_sampler", 3), "shape_slat_sampler"),
        (lambda c: c["args"].__setitem__("shape_slat_normalization", {"mean": "x"}), "shape_slat_normalization"),
    ]:
        bad = json.loads(json.dumps(cfg))
        mutate(bad)
        (root / "pipeline.json").write_text(json.dumps(bad))
        with pytest.raises(BadInput, match=needle) as info:
            PipelineConfig.open(root)
        assert "pipeline.json" in str(info.value) or "models." in str(info.value)
    (root / "pipeline.json").write_text("{not json")
    with pytest.raises(BadInput, match="pipeline.json"):
        PipelineConfig.open(root)


def test_big_images_are_decoded_in_a_killable_child(monkeypatch):
    """Over CHILD_PIXELS (lowered here) the decode runs in a child: same bytes as in-process, a
    cancel check that raises kills it at once, and a bad image still reports the loader's message."""
    import subprocess

    rgba = np.random.default_rng(1).integers(0, 256, (48, 64, 4), dtype=np.uint8)
    data = _png(rgba)
    monkeypatch.setattr(intake, "CHILD_PIXELS", 0)
    assert intake.validated_png(data, check=lambda: None) == intake.validated_png(data)
    children = []
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: children.append(real(*a, **k)) or children[-1])
    monkeypatch.setattr(intake, "POLL_S", 0.0)             # first poll right after the start: still running

    class Stop(Exception):
        pass

    def cancel():
        raise Stop

    with pytest.raises(Stop):
        intake.validated_png(data, check=cancel)
    assert len(children) == 1 and children[0].poll() is not None    # killed and reaped
    monkeypatch.setattr(intake, "POLL_S", 0.05)
    truncated = data[:len(data) // 2]
    with pytest.raises(BadInput, match="cannot read image"):
        intake.validated_png(truncated, check=lambda: None)
