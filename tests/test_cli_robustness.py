"""The ``trellis2`` CLI under user errors: one ``error:`` line, exit code 1 (130 for Ctrl-C), no
traceback unless ``--debug``, every argument and the output path checked before any model loads,
outputs written atomically with the umask's permissions."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from backend.cli import main

from _pipeline_helpers import object_rgba


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "in.png"
    Image.fromarray(object_rgba(), "RGBA").save(p)
    return p


def _gen(img, out, model, *extra):
    return main(["generate", str(img), "-o", str(out), "--model", str(model), "--device", "cpu", "-q", *extra])


@pytest.mark.parametrize("extra,needle", [
    (["--seed", str(1 << 64)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--texture-size", "65536"], "--texture-size"),
    (["--texture-size", "3"], "--texture-size"),
    (["--max-tokens", "10"], "--max-tokens"),
    (["--shape-slat-guidance", "nan"], "--shape-slat-guidance"),
    (["--tex-slat-steps", "0"], "--tex-slat-steps"),
])
def test_bad_arguments_fail_before_anything_loads(img, tmp_path, capsys, extra, needle):
    out = tmp_path / "o.glb"
    rc = _gen(img, out, tmp_path / "no-such-model", *extra)      # the model folder is never looked at
    err = capsys.readouterr().err
    assert rc == 1 and needle in err and "Traceback" not in err and "Model folder" not in err, err
    assert not out.exists()


def test_output_path_problems_are_found_first(img, tmp_path, capsys):
    assert _gen(img, tmp_path, tmp_path / "no-such-model") == 1
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert _gen(img, tmp_path / "f" / "o.glb", tmp_path / "no-such-model") == 1
    assert "not a folder" in capsys.readouterr().err
    secret = tmp_path / "environ.png"
    secret.write_text("HF_TOKEN=x")
    assert _gen(secret, tmp_path / "o.glb", tmp_path / "no-such-model") == 1
    err = capsys.readouterr().err
    assert "cannot read image" in err and "Traceback" not in err


def test_malformed_configs_are_one_line_errors(img, tiny_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "pipeline.json").read_text())
    cfg["args"]["models"] = ["not", "a", "dict"]
    (model / "pipeline.json").write_text(json.dumps(cfg))
    assert _gen(img, tmp_path / "o.glb", model) == 1
    err = capsys.readouterr().err
    assert "pipeline.json" in err and "Traceback" not in err and err.count("\n") == 1
    cfg["args"]["models"] = json.loads((tiny_dir / "pipeline.json").read_text())["args"]["models"]
    cfg["args"]["models"]["shape_slat_decoder"] = "../../../etc/passwd"
    (model / "pipeline.json").write_text(json.dumps(cfg))
    assert _gen(img, tmp_path / "o.glb", model) == 1
    assert "outside the model folder" in capsys.readouterr().err
    shutil.copy(tiny_dir / "pipeline.json", model / "pipeline.json")
    (model / "dinov3" / "config.json").write_text('{"hidden_size": "wide"')
    assert _gen(img, tmp_path / "o.glb", model, "--pipeline", "512") == 1
    err = capsys.readouterr().err
    assert "config.json" in err and "DINOv3" in err and "Traceback" not in err
    assert not (tmp_path / "o.glb").exists()


def test_ctrl_c_and_unexpected_errors(img, tmp_path, capsys, monkeypatch):
    import backend.pipelines as pipelines

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines, "load_pipeline", interrupted)
    assert _gen(img, tmp_path / "o.glb", tmp_path) == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "o.glb").exists()

    def broken(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pipelines, "load_pipeline", broken)
    assert _gen(img, tmp_path / "o.glb", tmp_path) == 1
    err = capsys.readouterr().err
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    assert main(["--debug", "generate", str(img), "-o", str(tmp_path / "o.glb"), "--model", str(tmp_path),
                 "-q"]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert _gen(img, tmp_path / "o.glb", tmp_path, "--debug") == 1          # also after the command
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    from backend.pipelines.export import write_glb

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    f = np.array([[0, 1, 2]], np.int32)
    uv = np.zeros((1, 3, 2), np.float32)
    old = os.umask(umask)
    try:
        p = write_glb(tmp_path / "o.glb", v, f, uv, np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.uint8))
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == mode
    assert [x.name for x in tmp_path.iterdir()] == ["o.glb"]                   # no temp file left


def test_checkpoint_config_with_wrong_types_is_missing_weights(img, tiny_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg_path = model / "ckpts" / "ss_flow_img_dit_1_3B_64_bf16.json"
    cfg = json.loads(cfg_path.read_text())
    key = next(k for k, v in cfg["args"].items() if isinstance(v, int) and not isinstance(v, bool))
    cfg["args"][key] = "many"
    cfg_path.write_text(json.dumps(cfg))
    assert _gen(img, tmp_path / "o.glb", model, "--pipeline", "512") == 1
    err = capsys.readouterr().err
    assert "ss_flow_img_dit_1_3B_64_bf16.json" in err and "cannot be used" in err
    assert "Traceback" not in err and err.count("\n") == 1
