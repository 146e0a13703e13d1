"""The backend over TCP on loopback (``trellis2 serve --listen 127.0.0.1:0``, fake runner).

Right / wrong / no token, TLS with a certificate made here, a client killed mid-job, two clients,
per-connection limits, idle timeout, clean shutdown; and the pipe mode opening no socket at all.
Every server here binds 127.0.0.1 only and is stopped by the fixture (SIGTERM, exit code 0).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from _backend_helpers import PYTHON, wait_gone
from backend import protocol as P
from backend import transport as T
from backend.fake_runner import fake_mesh

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals and /proc")
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes" * 4


class TcpServer:
    """A ``serve --listen`` subprocess on 127.0.0.1 with an ephemeral port."""

    def __init__(self, tmp: Path, *args: str, token: str | None = None) -> None:
        self.tmp = tmp
        self.cache = tmp / "server-cache"
        self.log = tmp / "server.log"
        self.token = token
        argv = [PYTHON, "-m", "backend", "serve", "--listen", "127.0.0.1:0", "--runner", "fake",
                "--cache-dir", str(self.cache), "--log", str(self.log), *args]
        if token:
            tf = tmp / "token"
            T.write_token_file(tf, token, overwrite=True)
            argv += ["--token-file", str(tf)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()   # "listening on 127.0.0.1:PORT" (bounded: the process ends or prints)
        assert line.startswith("listening on 127.0.0.1:"), (line, self.proc.stderr.read() if self.proc.poll() else "")
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def server(tmp_path):
    made: list[TcpServer] = []

    def make(*args: str, token: str | None = "t" * 8 + T.generate_token()) -> TcpServer:
        s = TcpServer(tmp_path, *args, token=token)
        made.append(s)
        return s

    yield make
    for s in made:
        assert s.stop() == 0, f"unclean shutdown: {s.proc.stderr.read()[-3000:]}"
        assert not wait_gone([s.proc.pid], 5.0)


@pytest.fixture
def bc(staged_extension):
    import trellis2.backend_client as mod

    return mod


@pytest.fixture
def remote(bc, tmp_path):
    import trellis2.remote_client as rc

    made = []

    def make(srv: TcpServer, **kw):
        kw.setdefault("cache_dir", tmp_path / f"client-cache-{len(made)}")
        c = rc.RemoteBackendClient("127.0.0.1", srv.port, kw.pop("token", srv.token), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop(timeout=2.0)


def _started(c):
    c.start()
    # status frames are broadcast: a server still winding down another connection's jobs may say busy right
    # after ready in the same poll, so wait for a ready that leaves the client ready
    c.wait_for(lambda m: m["type"] == "status" and m["state"] == "ready" and c.state == "ready", 20)
    assert c.state == "ready" and c.hello.get("remote") is True
    return c


def _until(c, job, timeout=30.0):
    return c.wait_for(lambda m: m["type"] in ("result", "error", "cancelled") and m.get("job") == job, timeout)


def _raw(port: int, token: str | None, **kw) -> tuple[socket.socket, P.FrameReader, P.FrameWriter]:
    sock = T.connect("127.0.0.1", port, token, **kw)
    sock.settimeout(10)
    stream = T.SocketStream(sock)
    return sock, P.FrameReader(stream), P.FrameWriter(stream)


def _next(reader: P.FrameReader) -> dict:
    """The next frame that is not a broadcast (``log`` line, ``status``)."""
    while (msg := reader.read())["type"] in ("log", "status"):
        pass
    return msg


def _read_all(reader: P.FrameReader, limit: int = 50) -> list[dict]:
    out = []
    for _ in range(limit):
        try:
            msg = reader.read()
        except OSError:
            break
        if msg is None:
            break
        out.append(msg)
    return out


# ------------------------------------------------------------------------------- authentication


def test_right_token_generate_with_image_bytes_progress_and_local_mirror(server, remote, tmp_path):
    srv = server()
    c = _started(remote(srv))
    image = tmp_path / "in.png"
    image.write_bytes(PNG)
    view = tmp_path / "side.png"
    view.write_bytes(PNG + b"side")
    job = c.generate(image=image, images=[str(image), str(view)], seed=5, steps=3, n_vertices=5000,
                     model_dir="/not/on/the/server", device="cuda")
    msgs = _until(c, job)
    assert [m["step"] for m in msgs if m["type"] == "progress"] == [1, 2, 3] * 3
    res = msgs[-1]
    assert res["type"] == "result"
    for name, ref in fake_mesh(5, 5000).items():
        assert zlib.crc32(res["arrays"][name].tobytes()) == zlib.crc32(ref.tobytes()), name
    # the server stored the bytes it was sent (not paths), views as input/view_k.png
    sjob = srv.cache / "jobs" / job
    assert (sjob / "input" / "image.png").read_bytes() == PNG
    assert (sjob / "input" / "view_1.png").read_bytes() == view.read_bytes()
    assert "model_dir" not in (sjob / "job.json").read_text()
    # the result is mirrored locally, and "folder" points at the local copy
    local = Path(res["folder"])
    assert local.is_relative_to(tmp_path / "client-cache-0") and res["remote_folder"] == str(sjob)
    assert (local / "input" / "image.png").read_bytes() == PNG
    with np.load(local / "result" / "result.npz") as z:
        assert np.array_equal(z["faces"], fake_mesh(5, 5000)["faces"])
    # upscale of that job (state on the server) and a texture-only job (mesh as arrays, textures back)
    up = c.upscale(job, steps=1)
    assert _until(c, up)[-1]["type"] == "result"
    v = np.random.default_rng(0).random((30, 3), dtype=np.float32)
    f = np.arange(30, dtype=np.int32).reshape(10, 3)
    tex = c.texture(v, f, image=image, seed=3, texture_size=16, steps=1)
    tres = _until(c, tex)[-1]
    assert tres["type"] == "result", tres
    assert tres["arrays"]["base_color"].shape == (16, 16, 4)
    assert (srv.cache / "jobs" / tex / "input" / "mesh.npz").is_file()
    assert srv.token not in srv.log.read_text()


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"])
def test_wrong_or_missing_token_gets_one_protocol_error_and_no_job_data_is_read(server, token):
    srv = server()
    sock, reader, writer = _raw(srv.port, token)
    msgs = _read_all(reader)
    assert [m["type"] for m in msgs] == ["error"] and msgs[0]["kind"] == "protocol"
    assert "Authentication" in msgs[0]["message"]
    sock.close()
    # a client that skips auth and sends a job frame straight away: refused before its payload is read
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    stream = T.SocketStream(sock)
    big = np.zeros(4 << 20, np.uint8)
    try:
        P.FrameWriter(stream).send({"type": "generate", "job": "sneaky", "arrays": {"image_png": big}})
    except OSError:
        pass   # the server may already have closed the socket while we were still sending
    msgs = _read_all(P.FrameReader(stream))
    assert [m["type"] for m in msgs] == ["error"] and "first frame must be 'auth'" in msgs[0]["message"]
    sock.close()
    assert not (srv.cache / "jobs" / "sneaky").exists()
    log = srv.log.read_text()
    assert "authentication failed" in log and srv.token not in log


def test_remote_client_with_wrong_token_reports_a_refused_connection(server, remote):
    srv = server()
    c = remote(srv, token="nope-nope-nope-nope")
    c.start()
    msgs = c.wait_for(lambda m: m["type"] == "exited", 10)
    exited = msgs[-1]
    assert not exited["expected"] and "wrong token" in exited["reason"] and c.state == "crashed"
    # reconnecting with the right token works (same client object)
    c._token = srv.token
    job = c.generate(seed=1, steps=1)
    assert _until(c, job)[-1]["type"] == "result"


def test_tls_with_a_self_signed_certificate(server, remote, tmp_path):
    pytest.importorskip("cryptography")
    from benchmarks.protocol import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    srv = server("--tls-cert", str(cert), "--tls-key", str(key))
    c = _started(remote(srv, tls=True, ca_file=cert))
    job = c.generate(seed=2, steps=2, n_vertices=2000)
    res = _until(c, job)[-1]
    assert res["type"] == "result" and np.array_equal(res["arrays"]["vertices"], fake_mesh(2, 2000)["vertices"])
    # a client that does not trust the certificate (system CAs only) cannot connect
    with pytest.raises(OSError):
        T.connect("127.0.0.1", srv.port, srv.token, tls=True, timeout=5)
    # a plain-TCP client gets nothing useful: the TLS handshake fails and the server closes
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        P.FrameWriter(T.SocketStream(sock)).send({"type": "auth", "token": srv.token})
    except OSError:
        pass   # already reset by the server: fine
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    assert P.MAGIC not in data
    sock.close()


# ------------------------------------------------------------------------------- connections


def test_client_killed_mid_job_cancels_its_job_and_the_server_keeps_serving(server, remote, tmp_path):
    srv = server()
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from backend import protocol as P, transport as T
        sock = T.connect("127.0.0.1", {srv.port}, {srv.token!r})
        s = T.SocketStream(sock)
        P.FrameWriter(s).send({{"type": "generate", "job": "victim", "seed": 1, "steps": 200, "step_s": 0.05}})
        r = P.FrameReader(s)
        while (m := r.read())["type"] != "progress":
            pass
        print("running", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "running"
    child.kill()
    child.wait(10)
    meta = srv.cache / "jobs" / "victim" / "job.json"
    end = time.monotonic() + 10
    while '"cancelled"' not in (meta.read_text() if meta.exists() else "") and time.monotonic() < end:
        time.sleep(0.05)
    assert '"cancelled"' in meta.read_text()
    assert srv.proc.poll() is None
    c = _started(remote(srv))
    job = c.generate(seed=4, steps=1)
    assert _until(c, job)[-1]["type"] == "result"


def test_two_clients_get_only_their_own_frames_and_cancel_only_their_own_jobs(server, remote):
    srv = server()
    a, b = _started(remote(srv)), _started(remote(srv))
    ja = a.generate(seed=1, steps=6, step_s=0.05, n_vertices=500)
    jb = b.generate(seed=2, steps=3, step_s=0.05, n_vertices=700)
    jb2 = b.generate(seed=3, steps=3, step_s=0.05)
    b.cancel(jb2)   # only b's job, even though a's is running
    ma, mb = _until(a, ja), b.wait_for(lambda m: m["type"] == "result" and m.get("job") == jb, 30)
    assert ma[-1]["type"] == "result" and ma[-1]["arrays"]["vertices"].shape == (500, 3)
    assert mb[-1]["arrays"]["vertices"].shape == (700, 3)
    assert all(m.get("job") in (ja, None) for m in ma if m["type"] in ("progress", "result", "cancelled"))
    assert all(m.get("job") in (jb, jb2, None) for m in mb if m["type"] in ("progress", "result", "cancelled"))
    assert b.jobs[jb2].state == "cancelled"
    # a cancel-all from a touches nothing of b's
    jb3 = b.generate(seed=4, steps=2, step_s=0.05)
    a.cancel(None)
    a.send({"type": "cancel"})
    assert _until(b, jb3)[-1]["type"] == "result"


def test_connection_limits_frame_size_queued_jobs_and_idle_timeout(server, remote, tmp_path):
    srv = server("--max-payload-mb", "1", "--max-jobs", "2", "--idle-timeout", "1.5")
    sock, reader, writer = _raw(srv.port, srv.token)
    assert [reader.read()["type"] for _ in range(2)] == ["hello", "status"]
    writer.send({"type": "ping", "arrays": {"x": np.zeros(2 << 20, np.uint8)}})
    writer.send({"type": "ping", "n": 1})
    got = [_next(reader) for _ in range(2)]
    assert got[0]["type"] == "error" and got[0]["kind"] == "protocol" and "limit" in got[0]["message"]
    assert got[1]["type"] == "pong" and got[1]["n"] == 1       # the connection goes on
    # paths on the server are refused; a third job of one connection is refused
    writer.send({"type": "generate", "job": "bypath", "image": "/etc/hostname"})
    err = _next(reader)
    assert err["type"] == "error" and err["field"] == "image" and err["job"] == "bypath"
    for k in range(3):
        writer.send({"type": "generate", "job": f"q{k}", "steps": 5, "step_s": 0.1})
    msgs = []
    while not any(m["type"] == "error" for m in msgs):
        msgs.append(reader.read())
    err = next(m for m in msgs if m["type"] == "error")
    assert err["job"] == "q2" and "2 jobs" in err["message"]
    sock.close()
    # idle timeout: a connection without jobs is closed, and the client takes it as a normal stop
    c = _started(remote(srv))
    exited = c.wait_for(lambda m: m["type"] == "exited", 10)[-1]
    assert exited["expected"] and exited["killed"] is False and c.state == "stopped"
    job = c.generate(seed=1, steps=1)   # reconnects
    assert _until(c, job)[-1]["type"] == "result"


def test_a_port_in_use_is_a_clear_error(server, tmp_path):
    srv = server()
    proc = subprocess.run([PYTHON, "-m", "backend", "serve", "--listen", f"127.0.0.1:{srv.port}", "--runner", "fake",
                           "--log", str(tmp_path / "second.log")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{srv.port}" in proc.stderr


def test_non_loopback_without_token_is_refused_before_binding(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "backend", "serve", "--listen", "0.0.0.0:0", "--runner", "fake"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "without a token" in proc.stderr and "listening" not in proc.stdout
    with pytest.raises(T.TransportError, match="without a token"):
        T.Listener("0.0.0.0", 0, lambda p: None, token=None)


def test_token_command_writes_0600_and_the_server_refuses_a_readable_token_file(tmp_path):
    from backend.cli import main

    tf = tmp_path / "tok"
    assert main(["token", str(tf)]) == 0
    assert stat.S_IMODE(tf.stat().st_mode) == 0o600 and len(T.read_token_file(tf)) >= 32
    assert main(["token", str(tf)]) == 1        # never overwritten by accident
    tf.chmod(0o644)
    with pytest.raises(T.TransportError, match="readable by others"):
        T.read_token_file(tf)
    assert T.token_matches("abc", "abc") and not T.token_matches("abd", "abc") and not T.token_matches(None, "abc")
    assert T.parse_listen("[::1]:9") == ("::1", 9) and T.parse_listen(":7") == ("127.0.0.1", 7)
    assert T.is_loopback("127.0.0.1") and T.is_loopback("localhost") and not T.is_loopback("0.0.0.0")
    assert "without TLS" in T.exposure_warning("0.0.0.0", tls=False)
    assert T.exposure_warning("0.0.0.0", tls=True) is None and T.exposure_warning("127.0.0.1", tls=False) is None


def test_sigterm_cancels_the_running_job_and_closes_connections(server, remote):
    srv = server()
    c = _started(remote(srv))
    job = c.generate(seed=1, steps=400, step_s=0.05)
    c.wait_for(lambda m: m["type"] == "progress", 20)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=10) == 0 and time.monotonic() - t0 < 5
    msgs = c.wait_for(lambda m: m["type"] == "exited", 10)
    assert c.jobs[job].state in ("cancelled", "lost")
    assert any(m["type"] == "cancelled" and m.get("job") == job for m in msgs) or c.jobs[job].state == "lost"
    meta = (srv.cache / "jobs" / job / "job.json").read_text()
    assert '"cancelled"' in meta


def test_pipe_mode_opens_no_socket(bc, staged_extension, tmp_path):
    c = bc.BackendClient(PYTHON, staged_extension, log_path=tmp_path / "b.log", cache_dir=tmp_path / "cache",
                         extra_args=["--runner", "fake"])
    try:
        c.start()
        c.wait_for(lambda m: m["type"] == "status", 30)
        job = c.generate(seed=1, steps=2)
        c.wait_for(lambda m: m["type"] == "result" and m.get("job") == job, 30)
        fds = Path(f"/proc/{c.pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir() if fd.exists()]
        assert links and not [x for x in links if x.startswith("socket:")], links
    finally:
        c.stop(timeout=2.0)


def test_the_addon_side_transport_is_stdlib_and_numpy_only(staged_extension):
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(staged_extension.parent)!r})
        import trellis2.backend.transport, trellis2.backend_client, trellis2.remote_client
        assert "torch" not in sys.modules and "bpy" not in sys.modules and "ray" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
