#!/usr/bin/env python3
"""Protocol throughput: round trip of big payloads through a real backend subprocess's pipes.

The add-on's client (from a staged extension) sends ``ping`` with one array; the backend
(``python -m backend serve --stdio --runner fake``: no torch) answers ``pong`` echoing the array.
The clock runs from the start of the send to the moment ``poll()`` hands the decoded echo to the
main thread, so it covers: encode + writev into the pipe, the backend's reader decoding into its
buffer, its writev back, the client's reader thread decoding, the queue hop to the main thread.

    python benchmarks/protocol.py [--mb 100] [--repeat 5] [--transport pipe tcp tls]

``--transport``: ``pipe`` (the add-on's default), ``tcp`` (``serve --listen 127.0.0.1:0`` with a
token, the add-on's :class:`RemoteBackendClient`), ``tls`` (the same with a throwaway self-signed
certificate; needs the ``cryptography`` package). Each transport runs the same round trips.

Prints one line per payload size: the best and median round trip, the payload rate
(``payload / round trip``) and the pipe rate (``2 * payload / round trip``, bytes moved both ways).
Checks the echo's CRC32 once per size. For comparison it then times the same round trip through a
bare echo child (plain ``os.write``/``os.readv``, no framing, no decoding, no queue): the difference
is the protocol's own cost; the rest is the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


_ECHO_CHILD = """
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from backend.protocol import enlarge_pipe
enlarge_pipe(0); enlarge_pipe(1)
n = int(sys.argv[2])
while True:
    buf = np.empty(n, np.uint8); mv = memoryview(buf); got = 0
    while got < n:
        k = os.readv(0, [mv[got:]])
        if not k:
            sys.exit(0)
        got += k
    while len(mv):
        mv = mv[os.write(1, mv):]
"""


def raw_pipe_baseline(nbytes: int, repeat: int) -> list[float]:
    """Round trips of ``nbytes`` through a bare echo child (os.write/readv, no protocol at all)."""
    import subprocess
    import threading

    from backend.protocol import enlarge_pipe

    child = subprocess.Popen([sys.executable, "-c", _ECHO_CHILD, str(ROOT), str(nbytes)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    enlarge_pipe(child.stdin.fileno())
    enlarge_pipe(child.stdout.fileno())
    data = np.ones(nbytes, np.uint8)
    times = []
    for i in range(repeat + 1):
        t0 = time.perf_counter()

        def write() -> None:
            v = memoryview(data)
            while len(v):
                v = v[os.write(child.stdin.fileno(), v):]

        th = threading.Thread(target=write)
        th.start()
        buf = np.empty(nbytes, np.uint8)
        mv, got = memoryview(buf), 0
        while got < nbytes:
            got += child.stdout.readinto(mv[got:])
        th.join()
        if i:
            times.append(time.perf_counter() - t0)
    child.stdin.close()
    child.wait()
    child.stdout.close()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, nargs="*", default=[1, 24, 100], help="payload sizes in MB (1e6 bytes)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare-pipe comparison")
    ap.add_argument("--transport", nargs="*", default=["pipe"], choices=("pipe", "tcp", "tls"))
    args = ap.parse_args()

    import build

    tmp = Path(tempfile.mkdtemp(prefix="t2-bench-"))
    ext = build.stage(tmp)
    sys.path.insert(0, str(tmp))
    import trellis2.backend_client as bc  # noqa: E402  (the staged add-on, as Blender imports it)

    for transport in args.transport:
        print(f"-- transport: {transport}")
        server = None
        if transport == "pipe":
            client = bc.BackendClient(sys.executable, ext, log_path=tmp / "backend.log", cache_dir=tmp / "cache",
                                      extra_args=["--runner", "fake"])
        else:
            server, client = _tcp_backend(bc, tmp, tls=transport == "tls")
        try:
            _round_trips(client, args)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
    if not args.no_baseline:
        nbytes = int(max(args.mb) * 1e6)
        times = raw_pipe_baseline(nbytes, args.repeat)
        size = nbytes / 1e6
        best, med = min(times), statistics.median(times)
        print(f"{size:7.1f} MB bare pipe echo (no protocol, same machine state): best {best * 1e3:8.1f} ms, "
              f"median {med * 1e3:8.1f} ms | payload {size / best:7.0f} MB/s (median {size / med:5.0f})")
    try:
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    return 0


def _tcp_backend(bc, tmp: Path, tls: bool):
    """A ``serve --listen 127.0.0.1:0`` fake backend (token; TLS with a throwaway certificate) and its client."""
    import subprocess

    import trellis2.remote_client as rc  # the staged add-on's remote client (same folder as ``bc``)

    from backend.transport import write_token_file

    token = write_token_file(tmp / "token", overwrite=True)
    argv = [sys.executable, "-m", "backend", "serve", "--listen", "127.0.0.1:0", "--runner", "fake",
            "--token-file", str(tmp / "token"), "--cache-dir", str(tmp / "cache-tcp"), "--log", str(tmp / "tcp.log")]
    cert = None
    if tls:
        cert, key = self_signed_cert(tmp)
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
    server = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              text=True)
    line = server.stdout.readline()
    port = int(line.rsplit(":", 1)[1])
    return server, rc.RemoteBackendClient("127.0.0.1", port, token, tls=tls, ca_file=cert, cache_dir=tmp / "cache-c")


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for ``localhost`` / ``127.0.0.1`` (needs ``cryptography``):
    ``(cert.pem, key.pem)`` in ``folder``, the key private (0600). Shared with tests/test_remote_tcp.py."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trellis2-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _round_trips(client, args) -> None:
    """Ping/pong round trips of every payload size through ``client``; prints one line per size."""
    t = time.perf_counter()
    client.start()
    client.wait_for(lambda m: m["type"] == "status", 60)
    print(f"backend ready in {time.perf_counter() - t:.3f} s (pid {client.pid})")
    try:
        for mb in args.mb:
            n = int(mb * 1e6) // 4
            data = np.random.default_rng(0).random(n, dtype=np.float32)
            crc = zlib.crc32(data)
            times = []
            for i in range(args.repeat + 1):
                t0 = time.perf_counter()
                client.ping(i=i, arrays={"x": data})
                while True:
                    msgs = client.poll()
                    pong = next((m for m in msgs if m["type"] == "pong" and m["i"] == i), None)
                    if pong is not None:
                        break
                    time.sleep(0.0002)
                dt = time.perf_counter() - t0
                if i == 0:
                    assert zlib.crc32(pong["arrays"]["x"]) == crc, "echo corrupted"
                    continue  # warm-up
                times.append(dt)
                del pong, msgs
            best, med = min(times), statistics.median(times)
            size = data.nbytes / 1e6
            print(f"{size:7.1f} MB round trip: best {best * 1e3:8.1f} ms, median {med * 1e3:8.1f} ms | "
                  f"payload {size / best:7.0f} MB/s (median {size / med:5.0f}) | "
                  f"pipe (both ways) {2 * size / best:7.0f} MB/s")
    finally:
        client.stop()


if __name__ == "__main__":
    raise SystemExit(main())
