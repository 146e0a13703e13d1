"""Unit tests of backend/protocol.py (framing, validation, resync) and backend/jobs.py (job folders)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from backend import jobs, protocol as P

REPO = Path(__file__).resolve().parents[1]


def _frame_bytes(msg) -> bytes:
    return b"".join(bytes(b) for b in P.encode(msg))


def _raw_frame(header: dict, payload: bytes = b"", *, magic=P.MAGIC, version=P.PROTOCOL_VERSION,
               hlen: int | None = None, plen: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return P.FIXED.pack(magic, version, 0, len(h) if hlen is None else hlen,
                        len(payload) if plen is None else plen) + h + payload


class _Pipe:
    """An os.pipe with a writer thread, read through FrameReader (like the real processes)."""

    def __init__(self, data: bytes, **kw) -> None:
        r, w = os.pipe()
        self.reader = P.FrameReader(r, **kw)
        self._r = r

        def feed():
            with os.fdopen(w, "wb") as fh:
                fh.write(data)

        self.t = threading.Thread(target=feed, daemon=True)
        self.t.start()

    def close(self) -> None:
        self.t.join(5)
        os.close(self._r)


def _read_all(data: bytes, **kw) -> list:
    """Every message or ProtocolError (as the exception object) until EOF / a fatal error."""
    pipe = _Pipe(data, **kw)
    out = []
    try:
        while True:
            try:
                m = pipe.reader.read()
            except P.ProtocolError as e:
                out.append(e)
                if e.fatal:
                    break
                continue
            if m is None:
                break
            out.append(m)
    finally:
        pipe.close()
    return out


ALL_DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
              np.float16, np.float32, np.float64]


def test_roundtrip_every_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = {}
    for i, dt in enumerate(ALL_DTYPES):
        shape = (3, 5, 2)[: 1 + i % 3]
        arrays[f"a{i}"] = (rng.random(shape) * 100).astype(dt)
    arrays["empty"] = np.zeros((0, 3), np.float32)
    arrays["scalar"] = np.array(7, np.int64)
    arrays["png"] = b"\x89PNG\r\n\x1a\nfake"
    arrays["strided"] = np.arange(40, dtype=np.int32).reshape(8, 5)[:, ::2]   # non-contiguous
    arrays["bigendian"] = np.arange(6, dtype=">f4")
    msg = {"type": "result", "job": "j1", "meta": {"x": [1, 2], "s": "é"}, "arrays": arrays}
    data = _frame_bytes(msg)
    for from_stream, out in ((False, P.decode(data)), (True, _read_all(data)[0])):
        assert out["type"] == "result" and out["job"] == "j1" and out["meta"] == {"x": [1, 2], "s": "é"}
        got = out["arrays"]
        assert set(got) == set(arrays)
        for k, v in arrays.items():
            ref = np.frombuffer(v, np.uint8) if isinstance(v, bytes) else np.asarray(v)
            assert got[k].shape == ref.shape, k
            assert np.array_equal(got[k], ref), k
        assert got["bigendian"].dtype.str == "<f4"
        # zero-copy: the arrays are views into the frame's payload buffer (writable when read from a stream)
        assert all(not a.flags.owndata for k, a in got.items() if a.size)
        assert got["a6"].flags.writeable == from_stream


def test_payload_offsets_are_aligned_and_checksums_survive_a_pipe():
    rng = np.random.default_rng(1)
    arrays = {"v": rng.random((123_457, 3), dtype=np.float32), "f": rng.integers(0, 9, (77_777, 3), dtype=np.int32),
              "h": rng.random(1001).astype(np.float16)}
    frames = b"".join(_frame_bytes({"type": "result", "job": f"j{i}", "arrays": arrays}) for i in range(3))
    out = _read_all(frames)
    assert [m["job"] for m in out] == ["j0", "j1", "j2"]
    hdr = json.loads(frames[P.FIXED_SIZE:P.FIXED_SIZE + struct.unpack_from("<I", frames, 8)[0]])
    assert all(s["offset"] % P.ALIGN == 0 for s in hdr["arrays"])
    for m in out:
        for k, v in arrays.items():
            assert zlib.crc32(m["arrays"][k].tobytes()) == zlib.crc32(v.tobytes())
            assert m["arrays"][k].ctypes.data % v.dtype.itemsize == 0


def test_encoder_refuses_bad_input():
    with pytest.raises(P.ProtocolError):
        P.encode({"type": "nope"})
    with pytest.raises(P.ProtocolError):
        P.encode({"type": "result", "arrays": {"o": np.array([object()], dtype=object)}})
    with pytest.raises(P.ProtocolError):
        P.encode({"type": "result", "arrays": {"c": np.zeros(2, np.complex64)}})
    with pytest.raises(P.ProtocolError):
        P.encode({"type": "result", "arrays": [np.zeros(2)]})


GOOD = {"type": "ping", "n": 1}


@pytest.mark.parametrize("bad,what", [
    (b"GARBAGE!" * 5, "magic"),
    (_raw_frame(GOOD, version=99), "version"),
    (_raw_frame({"type": "pingx"}), "type"),
    (P.FIXED.pack(P.MAGIC, P.PROTOCOL_VERSION, 0, 9, 0) + b"{not json", "JSON"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "|O", "shape": [1], "offset": 0,
                                               "nbytes": 8}]}, b"\0" * 8), "dtype"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": ">f4", "shape": [2], "offset": 0,
                                               "nbytes": 8}]}, b"\0" * 8), "dtype"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "<f4", "shape": [3], "offset": 0,
                                               "nbytes": 8}]}, b"\0" * 8), "nbytes"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "<f4", "shape": [2], "offset": 4,
                                               "nbytes": 8}]}, b"\0" * 8), "outside"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "<f4", "shape": [-2], "offset": 0,
                                               "nbytes": 8}]}, b"\0" * 8), "shape"),
    (_raw_frame({"type": "result", "arrays": [
        {"name": "x", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8},
        {"name": "y", "dtype": "<f4", "shape": [2], "offset": 4, "nbytes": 8}]}, b"\0" * 16), "overlap"),
    (_raw_frame({"type": "result", "arrays": [
        {"name": "x", "dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 4},
        {"name": "x", "dtype": "<f4", "shape": [1], "offset": 4, "nbytes": 4}]}, b"\0" * 8), "duplicate"),
    (_raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "<f4", "shape": [1] * 9, "offset": 0,
                                               "nbytes": 4}]}, b"\0" * 4), "shape"),
    (_raw_frame(GOOD, b"x" * 2048), "over the limit"),           # oversized payload, skipped exactly
    (_raw_frame(GOOD, hlen=1 << 30), "JSON header"),               # oversized header claim
    (_raw_frame(GOOD, plen=1 << 62), "over the limit"),           # absurd length: resync on magic
])
def test_bad_frame_is_rejected_and_stream_recovers(bad, what):
    good1 = _frame_bytes({"type": "ping", "n": 1})
    good2 = _frame_bytes({"type": "ping", "n": 2, "arrays": {"a": np.arange(5, dtype=np.int16)}})
    out = _read_all(good1 + bad + good2, max_payload=1024)
    errs = [o for o in out if isinstance(o, P.ProtocolError)]
    msgs = [o for o in out if isinstance(o, dict)]
    assert errs and all(not e.fatal for e in errs), out
    assert what.lower() in str(errs[0]).lower(), str(errs[0])
    assert [m["n"] for m in msgs] == [1, 2], out
    assert np.array_equal(msgs[-1]["arrays"]["a"], np.arange(5, dtype=np.int16))


def test_limits_are_checked_before_allocating(monkeypatch):
    """An oversized frame must not allocate its payload (np.empty is the only payload allocation)."""
    calls = []
    real_empty = np.empty
    monkeypatch.setattr(P.np, "empty", lambda *a, **k: calls.append(a) or real_empty(*a, **k))
    out = _read_all(_raw_frame(GOOD, b"y" * 4096) + _frame_bytes(GOOD), max_payload=1000)
    assert isinstance(out[0], P.ProtocolError) and out[1]["n"] == 1
    assert all(a[0] <= 1000 for a in calls), calls
    bad_dtype = _raw_frame({"type": "result", "arrays": [{"name": "x", "dtype": "|V8", "shape": [1],
                                                          "offset": 0, "nbytes": 8}]}, b"\0" * 8)
    calls.clear()
    out = _read_all(bad_dtype)
    assert isinstance(out[0], P.ProtocolError) and calls == []


@pytest.mark.parametrize("cut", [3, P.FIXED_SIZE + 2, -5])
def test_truncated_frame_is_fatal_not_a_crash(cut):
    data = _frame_bytes({"type": "result", "job": "j", "arrays": {"a": np.ones(100, np.float32)}})
    out = _read_all(_frame_bytes(GOOD) + data[:cut])
    assert out[0]["n"] == 1
    assert isinstance(out[1], P.ProtocolError) and out[1].fatal and "truncated" in str(out[1])


def test_decode_in_memory_checks_length():
    data = _frame_bytes(GOOD)
    assert P.decode(data)["n"] == 1
    with pytest.raises(P.ProtocolError):
        P.decode(data + b"x")
    with pytest.raises(P.ProtocolError):
        P.decode(data[:-1])


def test_writer_handles_partial_writes_to_a_small_pipe():
    """FrameWriter over a pipe far smaller than the frame, concurrently with two threads."""
    r, w = os.pipe()
    writer = P.FrameWriter(w)
    big = np.arange(3_000_000, dtype=np.float32)

    def send(i):
        writer.send({"type": "result", "job": f"t{i}", "arrays": {"x": big}})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    reader = P.FrameReader(r)
    got = [reader.read(), reader.read()]
    for t in threads:
        t.join()
    os.close(w)
    assert reader.read() is None
    os.close(r)
    assert sorted(m["job"] for m in got) == ["t0", "t1"]
    assert all(np.array_equal(m["arrays"]["x"], big) for m in got)


def test_shared_modules_do_not_import_torch_or_bpy():
    code = ("import sys; import backend.protocol, backend.jobs, backend.errors, backend.fake_runner; "
            "import backend.cli; backend.cli.build_parser(); "   # registering serve/selftest stays light
            "assert 'torch' not in sys.modules and 'bpy' not in sys.modules, 'heavy import'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ---------------------------------------------------------------------------------------- jobs


def test_job_store_roundtrip(tmp_path):
    store = jobs.JobStore(tmp_path)
    jid = jobs.new_job_id()
    assert jobs.valid_job_id(jid)
    job = store.open(jid, kind="generate", settings={"seed": 5, "pipeline_type": "512"})
    assert job.status == "queued" and job.meta()["settings"]["seed"] == 5
    job.save_image_bytes(b"\x89PNGdata")
    job.save_mesh({"vertices": np.ones((4, 3), np.float32), "faces": np.zeros((2, 3), np.int32)})
    job.save_state("cond", {"cond": np.arange(6, dtype=np.float32).reshape(2, 3), "seed": np.array([5])})
    job.set_status("running")
    assert job.effective_status() == "interrupted"            # no live backend owns it
    assert job.effective_status({jid}) == "running"
    job.save_result({"v": np.arange(3.0)}, {"kind": "mesh"})
    job.set_status("done")
    again = store.open(jid, settings={"texture_size": 1024})  # reopen merges settings, keeps the rest
    assert again.meta()["settings"] == {"seed": 5, "pipeline_type": "512", "texture_size": 1024}
    assert again.image_path.read_bytes() == b"\x89PNGdata"
    assert again.load_state("cond")["cond"].shape == (2, 3) and again.state_names() == ["cond"]
    arrays, meta = again.load_result()
    assert meta == {"kind": "mesh"} and np.array_equal(arrays["v"], np.arange(3.0))
    assert again.load_mesh()["faces"].dtype == np.int32
    assert [j.id for j in store.list()] == [jid]
    assert not list(Path(job.root).rglob("*.tmp")), "temporary files left behind"
    assert store.delete(jid) and store.get(jid) is None


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "a" * 200, "x\0y", None, 5, "a..b"])
def test_job_ids_cannot_escape_the_cache(tmp_path, bad):
    assert not jobs.valid_job_id(bad)
    with pytest.raises((ValueError, TypeError)):
        jobs.JobStore(tmp_path).open(bad)


def test_atomic_write_never_leaves_a_torn_file(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    jobs.atomic_write_json(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(jobs.os, "replace", boom)
    with pytest.raises(OSError):
        jobs.atomic_write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(TypeError):
        jobs.atomic_save_npz(tmp_path / "o.npz", {"o": np.array([{}], dtype=object)})


def test_portable_paths_without_readv_or_writev(monkeypatch):
    """The Windows code paths (no os.readv / os.writev) give the same frames."""
    monkeypatch.setattr(P, "_HAVE_READV", False)
    r, w = os.pipe()
    writer = P.FrameWriter(w)
    writer._use_writev = False
    arr = np.arange(300_000, dtype=np.float64)
    t = threading.Thread(target=lambda: (writer.send({"type": "pong", "arrays": {"a": arr}}), os.close(w)))
    t.start()
    reader = P.FrameReader(r)
    msg = reader.read()
    t.join()
    assert np.array_equal(msg["arrays"]["a"], arr) and reader.read() is None
    os.close(r)


@pytest.mark.parametrize("over", [1, 1 << 40])
def test_payload_just_over_the_limit_never_blocks_the_reader(over):
    """A frame declaring a payload above the limit (that never comes) is reported at once with its
    job id, nothing of it is read by its declared length, and a cancel sent right after it still gets
    through; the writer keeps the pipe open, so a reader waiting for the payload would block."""
    limit = 1 << 20
    r, w = os.pipe()
    reader = P.FrameReader(r, max_payload=limit)
    bad = _raw_frame({"type": "generate", "job": "big-1"}, plen=limit + over)
    os.write(w, bad + _frame_bytes({"type": "cancel", "job": "big-1"}))
    out: list = []

    def read_two():
        for _ in range(2):
            try:
                out.append(reader.read())
            except P.ProtocolError as e:
                out.append(e)

    t = threading.Thread(target=read_two, daemon=True)
    t.start()
    t.join(5)
    stuck = t.is_alive()
    os.close(w)
    t.join(5)
    os.close(r)
    assert not stuck, f"reader blocked on an over-limit frame: {out}"
    err, msg = out
    assert isinstance(err, P.ProtocolError) and not err.fatal and "over the limit" in str(err)
    assert err.job == "big-1"
    assert msg == {"type": "cancel", "job": "big-1"}


def test_magic_inside_a_rejected_payload_does_not_swallow_the_next_frame():
    """Re-synchronising through an over-limit payload that contains the magic (followed by random
    bytes, as in array data) still delivers the next real frame."""
    rng = np.random.default_rng(3)
    payload = b"".join(P.MAGIC + rng.integers(0, 256, 60, dtype=np.uint8).tobytes() for _ in range(50))
    bad = _raw_frame({"type": "result", "job": "j"}, payload)
    out = _read_all(bad + _frame_bytes({"type": "ping", "n": 9}), max_payload=1024)
    assert all(isinstance(o, P.ProtocolError) and not o.fatal for o in out[:-1])
    assert out[0].job == "j" and out[-1] == {"type": "ping", "n": 9}
