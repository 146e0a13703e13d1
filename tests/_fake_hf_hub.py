"""A small local stand-in for the Hugging Face Hub, speaking what huggingface_hub 0.36.2 requests.

* ``GET /api/models/{repo}[/revision/{rev}]?blobs=True``: id, sha and siblings (size, blobId, lfs).
* ``HEAD|GET /{repo}/resolve/{rev}/{file}``: small files are served directly (``ETag`` = git blob
  sha1, ``X-Repo-Commit``, ``Content-Length``); LFS files answer 302 with ``Location`` to
  ``/cdn/{sha256}`` plus ``X-Linked-Etag`` / ``X-Linked-Size``, like the real Hub's CDN redirect.
* ``GET /cdn/{sha256}``: the content, with ``Range`` support (206 + ``Content-Range``).
* Gated repos answer 401 with ``X-Error-Code: GatedRepo`` unless ``Authorization: Bearer <token>``.

Every request is recorded (method, path, headers). ``drop`` makes the next N content GETs of a file
stop halfway (the connection is closed); ``corrupt`` serves a file with one byte flipped.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    gated: bool = False
    sha: str = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The server: ``start()`` returns the endpoint URL; ``requests`` lists what was asked."""

    def __init__(self, token: Optional[str] = None) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.token = token
        self.requests: list[dict] = []
        self.drop: dict[str, int] = {}      # "repo/file" -> how many more content GETs to cut halfway
        self.corrupt: set[str] = set()      # "repo/file" served with a flipped byte
        self._server: Optional[ThreadingHTTPServer] = None

    # --- content ------------------------------------------------------------------------------
    def add(self, repo: str, files: dict[str, bytes], lfs: tuple[str, ...] = (), gated: bool = False) -> None:
        self.repos[repo] = FakeRepo(dict(files), set(lfs), gated)

    def _by_sha(self, sha: str) -> Optional[tuple[str, str]]:
        for rid, repo in self.repos.items():
            for name, data in repo.files.items():
                if name in repo.lfs and hashlib.sha256(data).hexdigest() == sha:
                    return rid, name
        return None

    def content_gets(self) -> list[dict]:
        """Recorded GETs of file content (resolve or CDN)."""
        return [r for r in self.requests if r["method"] == "GET" and ("/resolve/" in r["path"]
                                                                     or r["path"].startswith("/cdn/"))]

    # --- server -------------------------------------------------------------------------------
    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- handling -----------------------------------------------------------------------------
    def _reply(self, h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes = b"",
               head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        return self.token is not None and h.headers.get("Authorization") == f"Bearer {self.token}"

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append({"method": h.command, "path": path, "headers": {k.title(): v for k, v in h.headers.items()}})
        auth = h.headers.get("Authorization")
        if auth is not None and not self._authorized(h):
            return self._reply(h, 401, {"X-Error-Message": "Invalid credentials in Authorization header"},
                               b'{"error":"Invalid credentials in Authorization header"}', head)
        if path.startswith("/api/models/"):
            return self._model_info(h, path[len("/api/models/"):], head)
        if path.startswith("/cdn/"):
            found = self._by_sha(path[len("/cdn/"):])
            if found is None:
                return self._reply(h, 404, {}, b"", head)
            return self._content(h, *found, head)
        if "/resolve/" in path:
            rid, _, rest = path.lstrip("/").partition("/resolve/")
            _rev, _, name = rest.partition("/")
            return self._resolve(h, rid, name, head)
        self._reply(h, 404, {}, b"", head)

    def _model_info(self, h, rest: str, head: bool) -> None:
        rid = rest.split("/revision/")[0]
        repo = self.repos.get(rid)
        if repo is None:
            return self._reply(h, 404, {"X-Error-Code": "RepoNotFound"}, b'{"error":"Repository not found"}', head)
        siblings = []
        for name, data in repo.files.items():
            sib = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name in repo.lfs:
                sib["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sib)
        body = json.dumps({"id": rid, "sha": repo.sha, "gated": "manual" if repo.gated else False,
                           "siblings": siblings}).encode()
        self._reply(h, 200, {"Content-Type": "application/json"}, body, head)

    def _resolve(self, h, rid: str, name: str, head: bool) -> None:
        repo = self.repos.get(rid)
        if repo is None:
            return self._reply(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", head)
        if repo.gated and not self._authorized(h):
            return self._reply(h, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"},
                               b"", head)
        if name not in repo.files:
            return self._reply(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, b"", head)
        data = repo.files[name]
        if name in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            return self._reply(h, 302, {"Location": f"{self.url}/cdn/{sha}", "X-Repo-Commit": repo.sha,
                                        "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": len(data),
                                        "ETag": f'"{git_blob_id(data)}"'}, b"", head)
        self._content(h, rid, name, head, extra={"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_id(data)}"'})

    def _content(self, h, rid: str, name: str, head: bool, extra: Optional[dict] = None) -> None:
        key = f"{rid}/{name}"
        data = self.repos[rid].files[name]
        if key in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        body = data[start:]
        headers = dict(extra or {})
        headers["Content-Length"] = len(body)
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not head and self.drop.get(key, 0) > 0:
            self.drop[key] -= 1
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, str(v))
            h.end_headers()
            h.wfile.write(body[: max(1, len(body) // 2)])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)   # the transfer breaks off halfway
            return
        self._reply(h, status, headers, body, head)


def small_model_hub(token: Optional[str]) -> FakeHub:
    """A (not started) hub holding tiny stand-ins of the four repositories ``trellis2 download`` fetches;
    DINOv3 is gated (needs ``token``), BiRefNet also has remote code the download must skip."""
    hub = FakeHub(token=token)
    hub.add("facebook/dinov3-vitl16-pretrain-lvd1689m", {"config.json": b"{}", "model.safetensors": b"d" * 900},
            ("model.safetensors",), gated=True)
    hub.add("microsoft/TRELLIS-image-large", {"ckpts/ss_dec_conv3d_16l8_fp16.json": b"{}",
                                              "ckpts/ss_dec_conv3d_16l8_fp16.safetensors": b"s" * 700})
    hub.add("microsoft/TRELLIS.2-4B", {"pipeline.json": b"{}", "ckpts/a.safetensors": b"a" * 5000},
            ("ckpts/a.safetensors",))
    hub.add("ZhengPeng7/BiRefNet", {"config.json": b"{}", "model.safetensors": b"b" * 800, "birefnet.py": b"x"})
    return hub
