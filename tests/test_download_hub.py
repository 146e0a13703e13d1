"""``trellis2 download`` run for real (subprocess, huggingface_hub 0.36.2) against a local fake Hub:
files land byte-identical and verified, re-runs skip without fetching, a cut connection resumes with
an HTTP Range request, bad data fails as ``verify``, errors are classified without tracebacks, and the
token travels only as the Authorization header."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _fake_hf_hub import FakeHub

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTtoken0123456789abcdefSECRET"
BIG = bytes(range(256)) * (96 * 1024) + b"tail"  # 24 MB: more than two of huggingface_hub's 10 MB chunks


def _tree(big: bytes = BIG) -> dict[str, tuple[dict[str, bytes], tuple[str, ...], bool]]:
    return {
        "facebook/dinov3-vitl16-pretrain-lvd1689m": (
            {"config.json": b'{"model": "dinov3"}', "model.safetensors": b"D" * 3000}, ("model.safetensors",), True),
        "microsoft/TRELLIS-image-large": (
            {"ckpts/ss_dec_conv3d_16l8_fp16.json": b"{}", "ckpts/ss_dec_conv3d_16l8_fp16.safetensors": b"S" * 2000,
             "ckpts/slat_dec_gs.safetensors": b"X" * 5000}, ("ckpts/ss_dec_conv3d_16l8_fp16.safetensors",
                                                            "ckpts/slat_dec_gs.safetensors"), False),
        "microsoft/TRELLIS.2-4B": (
            {"pipeline.json": b'{"name": "trellis2"}', "ckpts/flow.safetensors": big}, ("ckpts/flow.safetensors",),
            False),
        "ZhengPeng7/BiRefNet": (
            {"config.json": b"{}", "model.safetensors": b"B" * 4000, "birefnet.py": b"print('remote code')"},
            ("model.safetensors",), False),
    }


@pytest.fixture
def hub():
    server = FakeHub(token=TOKEN)
    for rid, (files, lfs, gated) in _tree().items():
        server.add(rid, files, lfs, gated)
    with server:
        yield server


def run_download(endpoint: str, root: Path, *args: str, token: str | None = TOKEN, timeout: float = 120):
    """The real console command in a child Python; returns (returncode, events, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(root.parent / "hf_home"), PYTHONPATH=str(REPO))
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "backend", "download", "--root", str(root), "--json", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, events, proc.stdout, proc.stderr


def _no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def _all_text_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_download_all_verified_then_skipped(hub, tmp_path):
    root = tmp_path / "models"
    code, events, out, err = run_download(hub.url, root)
    assert code == 0, out + err
    _no_traceback(out, err)
    for rid, (files, _, _) in _tree().items():
        folder = root / rid.split("/")[1]
        for name, data in files.items():
            wanted = rid != "ZhengPeng7/BiRefNet" or name != "birefnet.py"
            wanted = wanted and not name.startswith("ckpts/slat_dec")        # the TRELLIS-image-large pattern
            assert (folder / name).is_file() == wanted, (rid, name)
            if wanted:
                assert (folder / name).read_bytes() == data
    plan = events[0]
    assert plan["event"] == "plan" and plan["repos"][0].startswith("facebook/dinov3") and plan["files"] == 8
    big = [e for e in events if e["event"] == "file" and e["file"] == "ckpts/flow.safetensors"]
    assert big[0]["done"] == 0 and big[-1]["done"] == big[-1]["total"] == len(BIG)
    assert {e["count"] for e in big} == {2} and big[0]["index"] in (1, 2)
    verified = [e for e in events if e["event"] == "verified"]
    assert len(verified) == 8 and not any(e["skipped"] for e in verified)
    assert [e["repo"] for e in events if e["event"] == "repo_done"] == list(_tree())
    assert events[-1] == {"event": "done", "files": 8}
    # the token went to the server as a Bearer header, and nowhere else
    assert any(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert TOKEN not in out + err and TOKEN.encode() not in _all_text_under(tmp_path)

    hub.requests.clear()
    code, events, out, err = run_download(hub.url, root)
    assert code == 0, out + err
    verified = [e for e in events if e["event"] == "verified"]
    assert len(verified) == 8 and all(e["skipped"] for e in verified)
    assert not [e for e in events if e["event"] == "file"]
    assert hub.content_gets() == [] and all(r["path"].startswith("/api/models/") for r in hub.requests)


def test_only_rembg_weights_and_config(hub, tmp_path):
    root = tmp_path / "models"
    code, events, out, err = run_download(hub.url, root, "--what", "rembg", token=None)
    assert code == 0, out + err
    assert sorted(p.name for p in (root / "BiRefNet").iterdir() if not p.name.startswith(".")) == [
        "config.json", "model.safetensors"]
    assert sorted(p.name for p in root.iterdir()) == ["BiRefNet"]


def test_cut_connection_resumes_with_range(hub, tmp_path):
    root = tmp_path / "models"
    hub.drop["microsoft/TRELLIS.2-4B/ckpts/flow.safetensors"] = 1
    code, events, out, err = run_download(hub.url, root, "--what", "models")
    assert code == 0, out + err
    flow = [r for r in hub.content_gets() if r["path"] == f"/cdn/{_sha256(BIG)}"]
    assert len(flow) == 2 and "Range" not in flow[0]["headers"]
    start = int(flow[1]["headers"]["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(BIG)            # only the rest was asked for
    assert (root / "TRELLIS.2-4B" / "ckpts" / "flow.safetensors").read_bytes() == BIG
    assert any(e["event"] == "verified" and e["file"] == "ckpts/flow.safetensors" for e in events)


def test_interrupted_run_resumes_in_the_next_run(hub, tmp_path):
    """The connection keeps breaking: the run fails as ``network`` and keeps the partial file; the next
    run asks only for the rest (Range) and ends verified."""
    root = tmp_path / "models"
    key = "microsoft/TRELLIS.2-4B/ckpts/flow.safetensors"
    hub.drop[key] = 99
    code, events, out, err = run_download(hub.url, root, "--what", "models")
    assert code == 3 and events[-1]["event"] == "error" and events[-1]["kind"] == "network", out + err
    _no_traceback(out, err)
    partial = list((root / "TRELLIS.2-4B" / ".cache").rglob("*.incomplete"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(BIG)
    have = partial[0].stat().st_size
    hub.drop[key] = 0
    hub.requests.clear()
    code, events, out, err = run_download(hub.url, root, "--what", "models")
    assert code == 0, out + err
    gets = hub.content_gets()
    assert [g["headers"].get("Range") for g in gets] == [f"bytes={have}-"]
    assert (root / "TRELLIS.2-4B" / "ckpts" / "flow.safetensors").read_bytes() == BIG


def test_damaged_local_file_is_fetched_again(hub, tmp_path):
    root = tmp_path / "models"
    assert run_download(hub.url, root, "--what", "rembg")[0] == 0
    weights = root / "BiRefNet" / "model.safetensors"
    weights.write_bytes(b"B" * 3999 + b"X")                  # same size, one byte off
    hub.requests.clear()
    code, events, out, err = run_download(hub.url, root, "--what", "rembg")
    assert code == 0, out + err
    assert weights.read_bytes() == b"B" * 4000
    assert [(e["file"], e["skipped"]) for e in events if e["event"] == "verified"] == [
        ("config.json", True), ("model.safetensors", False)]
    assert len(hub.content_gets()) == 1


def test_rerun_trusts_unchanged_files_without_hashing(hub, tmp_path):
    """A file hashed once and unchanged since (size + mtime_ns) is not read again; any change, a lost or a
    tampered record makes the next run hash it again."""
    root = tmp_path / "models"
    assert run_download(hub.url, root, "--what", "rembg")[0] == 0
    folder = root / "BiRefNet"
    record = folder / ".cache" / "trellis2-verified.json"
    assert set(json.loads(record.read_text())) == {"config.json", "model.safetensors"}

    def verified(*args: str) -> list[tuple[str, bool, bool]]:
        code, events, out, err = run_download(hub.url, root, "--what", "rembg", *args)
        assert code == 0, out + err
        return [(e["file"], e["skipped"], e["hashed"]) for e in events if e["event"] == "verified"]

    assert verified() == [("config.json", True, False), ("model.safetensors", True, False)]
    weights = folder / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"B" * 3999 + b"X")                  # same size, one byte off, written later
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    hub.requests.clear()
    assert verified() == [("config.json", True, False), ("model.safetensors", False, True)]
    assert weights.read_bytes() == b"B" * 4000 and len(hub.content_gets()) == 1
    record.unlink()
    assert verified() == [("config.json", True, True), ("model.safetensors", True, True)]
    entries = json.loads(record.read_text())
    entries["config.json"][2] = "0" * 40                      # a record that disagrees with the listing
    record.write_text(json.dumps(entries))
    assert verified()[0] == ("config.json", True, True)


def test_corrupted_file_fails_verify_and_is_deleted(hub, tmp_path):
    root = tmp_path / "models"
    hub.corrupt.add("ZhengPeng7/BiRefNet/model.safetensors")
    code, events, out, err = run_download(hub.url, root, "--what", "rembg")
    assert code == 3, out + err
    error = events[-1]
    assert error["event"] == "error" and error["kind"] == "verify" and "model.safetensors" in error["message"]
    assert error["advice"] and error["repo"] == "ZhengPeng7/BiRefNet"
    assert not (root / "BiRefNet" / "model.safetensors").exists()
    assert not list(root.rglob("*.incomplete"))
    assert len([r for r in hub.content_gets() if r["path"].startswith("/cdn/")]) == 2   # one retry
    _no_traceback(out, err)


def test_gated_without_token_fails_first(hub, tmp_path):
    root = tmp_path / "models"
    code, events, out, err = run_download(hub.url, root, token=None)
    assert code == 3
    error = events[-1]
    assert error["kind"] == "gated" and error["repo"] == "facebook/dinov3-vitl16-pretrain-lvd1689m"
    assert f"{hub.url}/facebook/dinov3-vitl16-pretrain-lvd1689m" in error["advice"] and "token" in error["advice"]
    assert not (root / "TRELLIS.2-4B").exists()          # the big model never started
    _no_traceback(out, err)


def test_invalid_token_is_auth(hub, tmp_path):
    code, events, out, err = run_download(hub.url, tmp_path / "models", token="hf_wrong_token_value")
    assert code == 3 and events[-1]["kind"] == "auth", out + err
    assert "hf_wrong_token_value" not in out + err
    _no_traceback(out, err)


def test_unreachable_endpoint_is_network(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, events, out, err = run_download(f"http://127.0.0.1:{port}", tmp_path / "models", timeout=60)
    assert code == 3 and events[-1]["kind"] == "network", out + err
    assert events[-1]["advice"]
    _no_traceback(out, err)


def test_disk_error_is_classified(hub, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (root / "BiRefNet").write_text("a file where the folder should be")
    code, events, out, err = run_download(hub.url, root, "--what", "rembg")
    assert code == 3 and events[-1]["kind"] == "disk", out + err
    assert str(root / "BiRefNet") in events[-1]["message"]
    _no_traceback(out, err)


@pytest.mark.parametrize("exc, kind", [
    (OSError(28, "No space left on device", "/m/x"), "disk"),
    (PermissionError(13, "Permission denied", "/m"), "disk"),
    (ValueError("odd\nsecond line\nthird"), "unexpected"),
])
def test_classify_without_traceback(exc, kind):
    from backend.download import classify

    err = classify(exc, "a/b")
    assert err.kind == kind and err.advice
    if kind == "unexpected":
        assert err.message == "ValueError: odd second line"

def test_human_output(hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "backend", "download", "--root", str(tmp_path / "m"),
                           "--what", "rembg"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "verified" in proc.stdout and "{" not in proc.stdout, proc.stdout


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
