"""``trellis2 ovoxel encode / decode / info`` end to end (through backend.cli.main)."""

from __future__ import annotations

import json

import numpy as np

from backend.cli import main
from backend.mesh_io import load_mesh
from backend.ovoxel import load_npz
from backend.ovoxel.meshutil import edge_stats


def test_cli_encode_decode_roundtrip(shared_dir, tmp_path, capsys):
    src = shared_dir / "assets" / "meshes" / "barrel" / "barrel.glb"
    out = tmp_path / "barrel.npz"
    assert main(["ovoxel", "encode", str(src), "-r", "64", "-o", str(out)]) == 0
    ov = load_npz(out)
    assert ov.resolution == 64 and ov.num_voxels > 1000 and ov.attrs is not None and ov.attrs.shape[1] == 6
    assert "normalization" in ov.meta
    srcmesh = load_mesh(src)
    for ext in ("glb", "ply", "obj"):
        dst = tmp_path / f"barrel.{ext}"
        assert main(["ovoxel", "decode", str(out), "-o", str(dst)]) == 0
        m = load_mesh(dst)
        assert m.num_faces > 1000 and edge_stats(m.faces)["inconsistent"] == 0 or ext != "glb"
        # mapped back to the source frame
        np.testing.assert_allclose(m.vertices.min(0), srcmesh.vertices.min(0), atol=0.1)
        np.testing.assert_allclose(m.vertices.max(0), srcmesh.vertices.max(0), atol=0.1)
    # vertex colours: the glb carries linear COLOR_0, the ply sRGB bytes; both brown-ish wood
    m = load_mesh(tmp_path / "barrel.glb")
    assert m.vertex_colors is not None and m.vertex_colors.shape[1] == 4
    import trimesh

    ply = trimesh.load(tmp_path / "barrel.ply", process=False)
    col = np.asarray(ply.visual.vertex_colors)[:, :3].astype(float).mean(0)
    assert col[0] > col[2]
    capsys.readouterr()
    assert main(["ovoxel", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["voxels"] == ov.num_voxels and info["resolution"] == 64
    # errors are reported, not raised
    assert main(["ovoxel", "decode", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "x.glb")]) == 1
    assert main(["ovoxel", "encode", str(src), "-r", "64", "-o", str(tmp_path / "x.npz"), "--no-normalize"]) == 1
    # .vxz output works too
    assert main(["ovoxel", "encode", str(src), "-r", "32", "-o", str(tmp_path / "b.vxz"), "--no-pbr"]) == 0
    assert main(["ovoxel", "decode", str(tmp_path / "b.vxz"), "-o", str(tmp_path / "b.ply")]) == 0
