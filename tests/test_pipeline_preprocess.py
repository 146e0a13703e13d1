"""Image preprocessing: official crop/premultiply, plain-background keyer, guards → BadInput."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.errors import BadInput
from backend.pipelines.preprocess import imagenet_tensor, key_plain_background, load_image, preprocess_image

from _pipeline_helpers import object_rgba


def test_rgba_passthrough_crop_and_premultiply():
    img = np.zeros((100, 120, 4), np.uint8)
    img[20:60, 30:90] = (200, 100, 50, 255)
    img[20:60, 30:40, 3] = 128          # alpha < 0.8: premultiplied, outside the crop box
    out = np.asarray(preprocess_image(Image.fromarray(img, "RGBA")))
    # box of alpha > 0.8*255: x 40..89, y 20..59 -> size 49, square crop of 48 (size//2 * 2)
    assert out.shape[0] == out.shape[1] == 48
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert tuple(out[24, 24]) == (200, 100, 50)
    # outside the object: black (premultiplied onto black)
    assert out[0].max() == 0 or out[-1].max() == 0


def test_large_image_downscaled_then_cropped():
    img = np.zeros((1500, 3000, 4), np.uint8)
    img[500:1000, 1000:2000] = 255
    out = preprocess_image(Image.fromarray(img, "RGBA"))
    assert max(out.size) <= 1024


def test_plain_background_keyer():
    rgb = np.full((120, 100, 3), 240, np.uint8)
    rgb[30:90, 20:80] = (10, 120, 200)
    rgb[50:60, 40:50] = 240             # interior hole of background colour stays opaque (not border-connected)
    alpha = key_plain_background(rgb)
    assert alpha is not None
    assert alpha[0, 0] == 0 and alpha[60, 50] == 255 and alpha[55, 45] == 255
    out = preprocess_image(Image.fromarray(rgb, "RGB"))
    assert out.size[0] == out.size[1] == 58 or out.size[0] == out.size[1] == 60


def test_noisy_background_needs_alpha_or_a_model():
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(BadInput, match="no transparency") as ei:
        preprocess_image(Image.fromarray(rgb, "RGB"))
    text = str(ei.value)   # names the preference, the download and the CLI flag
    assert "Background removal" in text and "ZhengPeng7/BiRefNet" in text and "--rembg-model" in text


def test_model_remover_interface():
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def remover(im):
        m = np.zeros((im.height, im.width), np.uint8)
        m[10:40, 20:50] = 255
        return Image.fromarray(m, "L")

    out = preprocess_image(Image.fromarray(rgb, "RGB"), remover=remover)
    assert out.size == (28, 28)


def test_fully_transparent_is_bad_input():
    img = np.zeros((32, 32, 4), np.uint8)
    img[..., 3] = 100                    # some alpha, none above 0.8
    with pytest.raises(BadInput, match="transparent"):
        preprocess_image(Image.fromarray(img, "RGBA"))


def _png_header_only(path, w, h):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_guard(tmp_path):
    p = tmp_path / "bomb.png"
    _png_header_only(p, 20000, 20000)
    with pytest.raises(BadInput, match="decompression-bomb|too large"):
        load_image(p)


def test_corrupt_and_missing_images(tmp_path):
    p = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.fromarray(object_rgba(), "RGBA").save(good)
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(BadInput):
        load_image(p)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(BadInput):
        load_image(tmp_path / "text.png")
    with pytest.raises(BadInput, match="not found"):
        load_image(tmp_path / "absent.png")


def test_imagenet_tensor():
    t = imagenet_tensor(Image.new("RGB", (40, 30), (255, 0, 0)), 32)
    assert t.shape == (3, 32, 32) and t.dtype == np.float32
    assert np.allclose(t[0], (1 - 0.485) / 0.229, atol=1e-5)
