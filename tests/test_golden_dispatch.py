"""The golden runner dispatches cases by their ``call``, not by their file name."""

from __future__ import annotations

import json
import shutil

from backend.golden import call_key, run_case


def _copy_case(golden_dir, tmp_path, src: str, dst: str, edit=None) -> None:
    shutil.copy(golden_dir / f"case_{src}.safetensors", tmp_path / f"case_{dst}.safetensors")
    meta = json.loads((golden_dir / f"case_{src}.json").read_text())
    if edit:
        edit(meta)
    (tmp_path / f"case_{dst}.json").write_text(json.dumps(meta))


def test_renamed_case_with_the_same_call_runs(golden_dir, tmp_path):
    _copy_case(golden_dir, tmp_path, "fdg_mesh_sphere", "mesh_extraction_other_shape",
               lambda m: m.update(call=m["call"].replace(", ", ",  ") + "   # another shape"))
    rep = run_case(tmp_path, "mesh_extraction_other_shape")
    assert rep.passed and not rep.missing_handler, rep.errors
    # an unknown call under an unknown name has no handler (and says which call)
    _copy_case(golden_dir, tmp_path, "fdg_mesh_sphere", "mystery", lambda m: m.update(call="y = mystery(x)"))
    rep = run_case(tmp_path, "mystery")
    assert rep.missing_handler and "mystery(x)" in rep.errors["*"]


def test_call_key_ignores_numbers_spacing_and_comments():
    assert call_key("f(a, grid_size=64)  # sphere") == call_key("f(a,  grid_size=128)")
    assert call_key("y = model(x, t, cond)") != call_key("y = model(SparseTensor(x, coords), t, cond)")


def test_every_golden_case_with_a_call_dispatches_by_it(golden_dir):
    import backend.golden as g

    g.handlers()
    for f in sorted(golden_dir.glob("case_*.json")):
        meta = json.loads(f.read_text())
        if meta.get("call"):
            assert call_key(meta["call"]) in g._BY_CALL, f.name
