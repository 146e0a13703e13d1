"""The add-on on a remote backend: Preferences › Backend = Remote, a ``trellis2 serve --listen``
process on 127.0.0.1 (fake runner, token), driven through the real operators.

generate (blocking in background mode) imports the mesh and lists it in the history (the result is
mirrored into the local cache); upscale reuses the server's job; cancel stops a running job; texture-only sends the mesh as arrays and
gets the textures back as frames; the server's job folders hold the images it was sent as bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import bpy
import numpy as np
import pytest

from helpers import addon_module, build_plain_mesh, draw_panel, our_class, prefs, stop_backend, write_png

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def remote_backend(addon, clean_scene, tmp_path):
    from backend.transport import write_token_file

    token = write_token_file(tmp_path / "token")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server_cache = tmp_path / "server-cache"
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--listen", "127.0.0.1:0", "--runner", "fake",
                             "--token-file", str(tmp_path / "token"), "--cache-dir", str(server_cache),
                             "--log", str(tmp_path / "server.log")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line
    p = prefs(addon)
    old = (p.backend_mode, p.remote_host, p.remote_port, p.remote_token, p.cache_dir, p.backend_python)
    stop_backend(addon)
    p.backend_mode = "REMOTE"
    p.remote_host, p.remote_port, p.remote_token = "127.0.0.1", int(line.rsplit(":", 1)[1]), token
    p.cache_dir = str(tmp_path / "local-cache")
    p.backend_python = ""          # a remote backend needs no local Python
    yield server_cache
    stop_backend(addon)
    p.backend_mode, p.remote_host, p.remote_port, p.remote_token, p.cache_dir, p.backend_python = old
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_remote_generate_cancel_and_texture_only(addon, remote_backend, tmp_path):
    from backend.fake_runner import fake_mesh

    runtime = addon_module(addon, "runtime")
    client_mod = addon_module(addon, "backend_client")
    png = write_png(tmp_path / "chair.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=5) == {"FINISHED"}
    assert isinstance(runtime.manager.client, addon_module(addon, "remote_client").RemoteBackendClient)
    objs = [o for o in bpy.data.objects if o.type == "MESH"]
    assert len(objs) == 1 and len(objs[0].data.vertices) == len(fake_mesh(5, 1000)["vertices"])
    job = objs[0]["trellis2_job"]
    assert (remote_backend / "jobs" / job / "input" / "image.png").read_bytes() == Path(png).read_bytes()
    st = bpy.context.window_manager.trellis2
    assert any(h.name == job for h in st.history)                 # from the local mirror
    assert (tmp_path / "local-cache" / "jobs" / job / "result" / "result.npz").is_file()
    # upscale: the source job's state lives on the server; the object gets the upscaled mesh
    bpy.context.view_layer.objects.active = objs[0]
    assert bpy.ops.trellis.upscale.poll()
    assert bpy.ops.trellis.upscale() == {"FINISHED"}, st.error
    obj = bpy.context.active_object
    assert obj["trellis2_upscaled_from"] == job and (remote_backend / "jobs" / obj["trellis2_job"]).is_dir()

    # cancel a running job
    m = runtime.manager
    rec = m.submit("generate", {"image": png, "seed": 1, "pipeline_type": "512", "steps": 80, "step_s": 0.05},
                   {"name": "c"})
    end = time.monotonic() + 20
    while rec.status != "running" and time.monotonic() < end:
        m.poll()
        time.sleep(0.02)
    assert bpy.ops.trellis.cancel() == {"FINISHED"}
    m.wait(rec, timeout=20)
    assert rec.status == "cancelled"

    # texture only: the selected mesh goes as arrays, the textures come back as frames
    for o in list(bpy.data.objects):
        o.select_set(False)
    obj = build_plain_mesh("Crate")
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    wood = write_png(tmp_path / "wood.png", seed=3)
    assert bpy.ops.trellis.texture_selected(filepath=wood, texture_size=64) == {"FINISHED"}
    mat = obj.data.materials[-1]
    imgs = [n.image for n in mat.node_tree.nodes if n.bl_idname == "ShaderNodeTexImage"]
    assert len(imgs) == 2 and all(tuple(i.size) == (64, 64) for i in imgs)
    texture_jobs = [p for p in (remote_backend / "jobs").iterdir() if p.name.startswith("texture")]
    assert len(texture_jobs) == 1 and (texture_jobs[0] / "input" / "mesh.npz").is_file()
    with np.load(texture_jobs[0] / "input" / "mesh.npz") as z:
        assert z["faces"].shape[1] == 3 and len(z["vertices"]) > 0


def test_remote_backend_gone_is_reported_like_a_crash_and_reconnects(addon, remote_backend, tmp_path):
    runtime = addon_module(addon, "runtime")
    png = write_png(tmp_path / "a.png")
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=2) == {"FINISHED"}
    m = runtime.manager
    m.client.kill(reason="test dropped the connection")
    end = time.monotonic() + 10
    while m.backend_state != "CRASHED" and time.monotonic() < end:
        m.poll()
        time.sleep(0.02)
    assert m.backend_state == "CRASHED" and "dropped" in m.crash_message
    assert bpy.ops.trellis.generate(filepath=png, pipeline="512", seed=3) == {"FINISHED"}   # reconnected


def test_panel_and_preferences_show_the_remote_backend(addon, remote_backend):
    p = prefs(addon)
    layout = draw_panel(our_class(addon, "TRELLIS_PT_main"))
    assert f"Remote: 127.0.0.1:{p.remote_port}" in layout.texts()
    assert "trellis.generate" in layout.operators()          # no local Python needed
    assert p.bl_rna.properties["remote_token"].subtype == "PASSWORD"
    assert "MPS" in {i.identifier for i in p.bl_rna.properties["device"].enum_items}
    p.remote_host = "192.0.2.1"                                  # never contacted: only the warning is drawn
    try:
        prefs_layout = draw_panel(type(p), wrapped=p)
        assert any("in clear" in t for t in prefs_layout.texts())
    finally:
        p.remote_host = "127.0.0.1"
