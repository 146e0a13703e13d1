"""The "Create backend environment" plan (trellis_blender/env_setup.py, pure Python, no bpy): which torch
build is installed from where, for every build choice on Linux, Windows and macOS; the torch pin read
from the bundled requirements.txt; clear errors. Nothing here runs pip."""

from __future__ import annotations

import re

import pytest

PLATFORMS = ("linux", "win32", "darwin")
BUILDS = ("AUTO", "CU130", "CU128", "CU126", "CPU", "CUSTOM")
CUSTOM = "https://mirror.example.com/whl/cu129"
IDX = "https://download.pytorch.org/whl/"
# expected torch index per (platform, build): None = PyPI through requirements.txt only; "error" = refused
EXPECTED = {
    ("linux", "AUTO"): None, ("win32", "AUTO"): IDX + "cu130", ("darwin", "AUTO"): None,
    **{(p, "CU130"): IDX + "cu130" for p in ("linux", "win32")},
    **{(p, "CU128"): IDX + "cu128" for p in ("linux", "win32")},
    **{(p, "CU126"): IDX + "cu126" for p in ("linux", "win32")},
    **{(p, "CPU"): IDX + "cpu" for p in PLATFORMS},
    **{(p, "CUSTOM"): CUSTOM for p in PLATFORMS},
    **{("darwin", b): "error" for b in ("CU130", "CU128", "CU126")},
}


@pytest.fixture
def tasks(staged_extension):
    import trellis2.env_setup as mod

    return mod


def _pin(ext) -> str:
    text = (ext / "backend" / "requirements.txt").read_text()
    return re.search(r"^torch==(\S+)", text, re.M).group(1)


def test_enum_matches_the_table(tasks):
    assert tuple(b for b, _, _ in tasks.TORCH_BUILDS) == BUILDS
    assert {k for k in EXPECTED} == {(p, b) for p in PLATFORMS for b in BUILDS}


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("build", BUILDS)
def test_plan_for_every_build_and_platform(tasks, staged_extension, tmp_path, platform, build):
    env = str(tmp_path / "env")
    expected = EXPECTED[(platform, build)]
    if expected == "error":
        with pytest.raises(ValueError, match="macOS"):
            tasks.env_install_plan(env, staged_extension, build, CUSTOM, platform, "base-python")
        assert "macOS" in tasks.torch_build_hint(build, platform)
        return
    plan = tasks.env_install_plan(env, staged_extension, build, CUSTOM, platform, "base-python")
    py = str(tmp_path / "env" / ("Scripts/python.exe" if platform == "win32" else "bin/python"))
    req = str(staged_extension / "backend" / "requirements.txt")
    head = [["base-python", "-m", "venv", env], [py, "-m", "pip", "install", "--upgrade", "pip"]]
    tail = [[py, "-m", "pip", "install", "-r", req]]
    if expected is None:
        assert plan == head + tail
    else:  # torch first, from its own index only (no PyPI extra index), pinned to the bundled version
        torch_step = [py, "-m", "pip", "install", "--force-reinstall", f"torch=={_pin(staged_extension)}",
                      "--index-url", expected]
        assert plan == head + [torch_step] + tail
        assert "--extra-index-url" not in torch_step
    assert tasks.torch_build_hint(build, platform)


def test_pin_comes_from_the_bundled_requirements(tasks, staged_extension, tmp_path):
    assert tasks.torch_pin(staged_extension) == _pin(staged_extension) == "2.13.0"
    fake = tmp_path / "ext"
    (fake / "backend").mkdir(parents=True)
    req = fake / "backend" / "requirements.txt"
    req.write_text("# torch==1.0 in a comment\ntorchvision==0.1\n  torch == 9.8.7  # pinned\nnumpy\n")
    assert tasks.torch_pin(fake) == "9.8.7"
    plan = tasks.env_install_plan("/e", fake, "CPU", platform="linux", base_python="py")
    assert "torch==9.8.7" in plan[2]
    req.write_text('torch==3.0.1 ; platform_system != "Darwin"\n')
    assert tasks.torch_pin(fake) == "3.0.1"


def test_requirements_missing_or_unpinned(tasks, tmp_path):
    (tmp_path / "backend").mkdir()
    with pytest.raises(FileNotFoundError, match="requirements.txt is missing"):
        tasks.env_install_plan("/e", tmp_path, "AUTO", platform="linux", base_python="py")
    (tmp_path / "backend" / "requirements.txt").write_text("torch>=2.13\nnumpy\n")
    for build in ("AUTO", "CU128"):
        with pytest.raises(ValueError, match="torch==<version>"):
            tasks.env_install_plan("/e", tmp_path, build, platform="linux", base_python="py")


@pytest.mark.parametrize("url", ["", "   ", "download.pytorch.org/whl/cu129", "ftp://host/simple",
                                 "file:///opt/wheels", "https://", "http:// spaces"])
def test_custom_needs_an_http_url(tasks, staged_extension, url):
    with pytest.raises(ValueError, match="Custom index"):
        tasks.env_install_plan("/e", staged_extension, "CUSTOM", url, "linux", "py")


def test_custom_url_is_stripped_and_unknown_build_refused(tasks, staged_extension):
    plan = tasks.env_install_plan("/e", staged_extension, "CUSTOM", "  http://10.0.0.2:8080/simple \n",
                                  "linux", "py")
    assert plan[2][-2:] == ["--index-url", "http://10.0.0.2:8080/simple"]
    with pytest.raises(ValueError, match="Unknown torch build"):
        tasks.env_install_plan("/e", staged_extension, "ROCM", "", "linux", "py")


def test_create_env_task_titles_follow_the_plan(tasks, staged_extension, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/blender/python/lib")
    t = tasks.create_env_task(str(tmp_path / "env"), staged_extension, tmp_path / "log", "py", build="CPU")
    assert t.steps == tasks.env_install_plan(str(tmp_path / "env"), staged_extension, "CPU", base_python="py")
    assert list(t.step_titles) == ["create venv", "upgrade pip", "install torch (cpu)",
                                   "install backend requirements"]
    assert "PYTHONPATH" not in t.env and t.running and t._proc is None  # built, not started
    t = tasks.create_env_task(str(tmp_path / "env"), staged_extension, tmp_path / "log", "py",
                              build="CUSTOM", custom_url=CUSTOM)
    assert t.step_titles[2] == "install torch (custom index)" and len(t.step_titles) == len(t.steps)


def test_hints(tasks):
    assert "580" in tasks.torch_build_hint("CU130", "linux")
    assert "PyPI" in tasks.torch_build_hint("AUTO", "linux") and "CUDA 13.0" in tasks.torch_build_hint("AUTO", "linux")
    assert "cu130" in tasks.torch_build_hint("AUTO", "win32")
    assert "CPU" in tasks.torch_build_hint("AUTO", "darwin")
    for p in PLATFORMS:
        for b in BUILDS:
            assert 0 < len(tasks.torch_build_hint(b, p)) <= 90
