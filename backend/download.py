"""``trellis2 download``: fetch the model weights from the Hugging Face Hub, resumable and verified.

The repository table (:data:`MODEL_REPOS`, :data:`REMBG_REPO`) is the one source of truth; the
add-on imports it from its bundled copy of this package, so this module's top level is stdlib only
(``huggingface_hub`` is imported inside :func:`run`).

Per repository the file list with sizes and hashes comes from one ``model_info(files_metadata=True)``
call. A file already present with the right size and hash is reported ``verified`` without any
further request; any other is fetched with ``hf_hub_download(local_dir=…)``, which resumes a partial
``.incomplete`` file with an HTTP Range request, then hashed (sha256 for LFS files, the git blob
sha1 for small ones). A mismatch deletes the file and fetches it once more.

Output: one JSON object per line with ``--json`` (the add-on), readable lines otherwise. Errors
never show a traceback; they end with an ``error`` event (kind, message, advice) and exit code 3.
The access token is only ever read by huggingface_hub from ``HF_TOKEN`` (or its own login).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

EXIT_FAILED = 3


@dataclass(frozen=True)
class Repo:
    """One Hugging Face repository: where it goes (``<root>/<folder>``) and which files (None: all)."""

    repo_id: str
    folder: str
    patterns: Optional[tuple[str, ...]] = None


#: The gated DINOv3 comes first: a missing licence acceptance or login fails in seconds, not after
#: the 16 GB model. TRELLIS-image-large contributes only the sparse-structure decoder.
MODEL_REPOS: tuple[Repo, ...] = (
    Repo("facebook/dinov3-vitl16-pretrain-lvd1689m", "dinov3-vitl16-pretrain-lvd1689m"),
    Repo("microsoft/TRELLIS-image-large", "TRELLIS-image-large", ("ckpts/ss_dec_conv3d_16l8_fp16.*",)),
    Repo("microsoft/TRELLIS.2-4B", "TRELLIS.2-4B"),
)
#: The background remover (MIT, ungated): only the weights and config, never its remote code.
REMBG_REPO = Repo("ZhengPeng7/BiRefNet", "BiRefNet", ("model.safetensors", "config.json"))


def repos_for(what: str) -> tuple[Repo, ...]:
    """The repositories of ``what``: ``all`` (models, then BiRefNet), ``models`` or ``rembg``."""
    return {"all": MODEL_REPOS + (REMBG_REPO,), "models": MODEL_REPOS, "rembg": (REMBG_REPO,)}[what]


class DownloadError(Exception):
    """A classified failure: ``kind`` is gated, auth, not_found, network, disk, verify or unexpected."""

    def __init__(self, kind: str, message: str, advice: str = "", repo: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.advice, self.repo = kind, message, advice, repo


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repository listing: its path, size and expected hash."""

    name: str
    size: int
    sha256: Optional[str]   # LFS files
    blob_id: Optional[str]  # the git blob sha1 (small files)


# --- hashing ------------------------------------------------------------------------------------

def file_digest(path: Path, remote: RemoteFile) -> str:
    """The hash of ``path`` comparable to ``remote``: sha256 (LFS) or git's ``sha1("blob N\\0" + data)``."""
    if remote.sha256:
        h = hashlib.sha256()
    else:
        h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_intact(path: Path, remote: RemoteFile) -> bool:
    """Whether ``path`` exists with ``remote``'s size and hash (a file without a known hash: size only)."""
    if not path.is_file() or path.stat().st_size != remote.size:
        return False
    expected = remote.sha256 or remote.blob_id
    return expected is None or file_digest(path, remote) == expected


class VerifiedRecord:
    """The files of one folder this tool has already hashed: ``name → [size, mtime_ns, hash]`` in
    ``<folder>/.cache/trellis2-verified.json``. A file unchanged since (same size and modification time, to
    the nanosecond) with the same published hash is not read again, so a re-run over 18 GB of weights
    takes seconds, not a minute of hashing; any change to the file hashes it again."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / ".cache" / "trellis2-verified.json"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, list] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _key(path: Path, remote: RemoteFile) -> Optional[list]:
        expected = remote.sha256 or remote.blob_id
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, expected] if expected else None

    def trusted(self, path: Path, remote: RemoteFile) -> bool:
        """``path`` was hashed before, matched ``remote``'s hash, and has not changed since."""
        key = self._key(path, remote)
        return key is not None and key[0] == remote.size and self.entries.get(remote.name) == key

    def add(self, path: Path, remote: RemoteFile) -> None:
        """Remember that ``path`` (just hashed) matches ``remote``; written at once (a later failure keeps it)."""
        key = self._key(path, remote)
        if key is None:
            return
        self.entries[remote.name] = key
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass   # only a cache: the next run hashes again


# --- errors -------------------------------------------------------------------------------------

_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR,
                errno.EISDIR}


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] or type(exc).__name__


def classify(exc: BaseException, repo: str) -> DownloadError:
    """Turn any exception of a download into a :class:`DownloadError` (no traceback, no token)."""
    if isinstance(exc, DownloadError):
        return exc
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    endpoint = constants.ENDPOINT
    page = f"{endpoint.rstrip('/')}/{repo}"
    if isinstance(exc, hf_errors.GatedRepoError):
        return DownloadError("gated", f"{repo} is a gated repository and this account has no access to it.",
                             f"Open {page} , accept its licence (logged in), then give an access token "
                             "(Download Models asks for one) or run 'hf auth login', and download again.")
    if isinstance(exc, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
                        hf_errors.EntryNotFoundError)):
        return DownloadError("not_found", f"{repo}: not found ({_first_line(exc)})",
                             f"Check that {page} exists; a private or gated repository needs a valid token.")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return DownloadError("network", "Offline mode is on (HF_HUB_OFFLINE).",
                             "Unset HF_HUB_OFFLINE to let the download reach the Hub.")
    if isinstance(exc, hf_errors.HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return DownloadError("auth", f"{repo}: the Hub refused the access token (HTTP {status}).",
                                 "Check the token (huggingface.co › Settings › Access Tokens; it needs read "
                                 "access, and access to gated repositories), or log in with 'hf auth login'.")
        if status >= 500:
            return DownloadError("network", f"{repo}: the Hub answered HTTP {status}.",
                                 "The Hub has a problem right now; try again later (the download resumes).")
    if _transient(exc) or isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return DownloadError("network", f"Cannot reach {endpoint}: {_first_line(exc)}",
                             "Check the internet connection (and proxy); press Download again to resume.")
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return DownloadError("disk", f"Cannot write the model files ({exc.strerror}{where}).",
                             "Free disk space or choose a writable folder (about 18 GB for all models).")
    return DownloadError("unexpected", f"{type(exc).__name__}: {_first_line(exc)}",
                         "Press Download again (it resumes); the download log has the details.")


# --- output -------------------------------------------------------------------------------------

def _gb(n: int) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class Reporter:
    """Writes events: JSON lines (``json_lines``) or readable text, thread-safe, throttled progress."""

    def __init__(self, json_lines: bool, stream=None, interval: float = 0.5) -> None:
        self.json_lines, self.stream, self.interval = json_lines, stream or sys.stdout, interval
        self._lock = threading.Lock()
        self._last = 0.0

    def emit(self, event: str, **fields) -> None:
        with self._lock:
            if self.json_lines:
                self.stream.write(json.dumps({"event": event, **fields}) + "\n")
            else:
                text = self._human(event, fields)
                if text is None:
                    return
                self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, force: bool = False, **fields) -> None:
        """A ``file`` event, at most every ``interval`` seconds (human mode: every 10 × interval)."""
        now = time.monotonic()
        gap = self.interval * (1 if self.json_lines else 10)
        if force or now - self._last >= gap:
            self._last = now
            self.emit("file", **fields)

    @staticmethod
    def _human(event: str, f: dict) -> Optional[str]:
        where = f"{f.get('repo', '')} [{f.get('index', 0)}/{f.get('count', 0)}] {f.get('file', '')}"
        if event == "plan":
            return f"{len(f['repos'])} repositories, {f['files']} files, {_gb(f['bytes'])}"
        if event == "file":   # the start and end of a file: its "verified" line says enough
            return None if f["done"] in (0, f["total"]) else f"{where}: {_gb(f['done'])} / {_gb(f['total'])}"
        if event == "verified":
            return f"{where}: verified ({_gb(f['total'])}" + (", already there)" if f.get("skipped") else ")")
        if event == "repo_done":
            return f"{f['repo']}: complete in {f['folder']}"
        if event == "done":
            return f"done: {f['files']} files verified"
        if event == "error":
            return f"error ({f['kind']}): {f['message']}\n{f['advice']}"
        return None


# --- the download -------------------------------------------------------------------------------

def list_files(api, repo: Repo) -> tuple[str, list[RemoteFile]]:
    """The repository's commit and its files matching ``repo.patterns`` (with sizes and hashes)."""
    from huggingface_hub.utils import filter_repo_objects

    info = api.model_info(repo.repo_id, revision="main", files_metadata=True)
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=list(repo.patterns or ()) or None,
                                        key=lambda s: s.rfilename))
    files = [RemoteFile(s.rfilename, int(s.lfs.size if s.lfs else (s.size or 0)),
                        s.lfs.sha256 if s.lfs else None, s.blob_id if not s.lfs else None) for s in siblings]
    if not files:
        raise DownloadError("not_found", f"{repo.repo_id}: no files match {list(repo.patterns or ())}",
                            "The repository changed; update the add-on.")
    return info.sha, files


def _incomplete_files(dest: Path, name: str) -> list[Path]:
    """huggingface_hub's partial downloads of ``name`` under ``dest/.cache/huggingface/download``."""
    from huggingface_hub._local_folder import get_local_download_paths

    pattern = get_local_download_paths(dest, name).incomplete_path("ETAG")
    return sorted(pattern.parent.glob(pattern.name.replace("ETAG", "*")))


def _watch(dest: Path, name: str, on_size: Callable[[int], None], stop: threading.Event) -> None:
    """Report the size of the growing ``.incomplete`` file until ``stop`` is set."""
    while not stop.wait(0.25):
        parts = _incomplete_files(dest, name)
        if parts:
            try:
                on_size(parts[-1].stat().st_size)
            except OSError:
                pass


def _discard(dest: Path, remote: RemoteFile) -> None:
    """Delete a bad copy of ``remote`` and its partial downloads, so the next try starts clean."""
    for path in [dest / remote.name, *_incomplete_files(dest, remote.name)]:
        path.unlink(missing_ok=True)


NETWORK_RETRIES = 3  # a dropped connection is resumed (HTTP Range) this many times before giving up


def _transient(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))


def _fetch_once(repo: Repo, commit: str, dest: Path, remote: RemoteFile, on_size: Callable[[int], None]) -> None:
    """One ``hf_hub_download`` (it resumes a partial file), retried after a dropped connection."""
    from huggingface_hub import hf_hub_download

    for retry in range(NETWORK_RETRIES + 1):
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(dest, remote.name, on_size, stop), daemon=True)
        watcher.start()
        try:
            hf_hub_download(repo.repo_id, remote.name, revision=commit, local_dir=dest)
            return
        except OSError as exc:
            if _transient(exc) and retry < NETWORK_RETRIES:
                time.sleep(0.5 * (retry + 1))
                continue
            if exc.errno is not None or "Consistency check failed" not in str(exc):
                raise
            return  # fewer/more bytes than announced: the hash check below rejects the file
        finally:
            stop.set()
            watcher.join()


def fetch_file(repo: Repo, commit: str, dest: Path, remote: RemoteFile,
               on_size: Callable[[int], None]) -> None:
    """Download ``remote`` into ``dest`` (resuming), verify it; one retry after a bad hash."""
    (dest / remote.name).unlink(missing_ok=True)   # a stale or damaged copy (its partial download stays)
    for _attempt in (1, 2):
        _fetch_once(repo, commit, dest, remote, on_size)
        if is_intact(dest / remote.name, remote):
            return
        _discard(dest, remote)
    raise DownloadError("verify", f"{repo.repo_id}/{remote.name}: the downloaded file does not match its "
                                  "published hash (twice); it was deleted.",
                        "Press Download again; if it keeps failing, the network or a proxy alters the data.")


def download(repos: Sequence[Repo], root: Path, reporter: Reporter, api=None) -> int:
    """Fetch and verify every file of ``repos`` under ``root``; returns the number of files.

    Raises :class:`DownloadError` (with ``repo`` set) for any failure.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    listings = []
    for repo in repos:
        with _failing_as(repo):
            listings.append((repo, *list_files(api, repo)))
    reporter.emit("plan", repos=[r.repo_id for r in repos], files=sum(len(f) for _, _, f in listings),
                  bytes=sum(x.size for _, _, f in listings for x in f))
    total_files = 0
    for repo, commit, files in listings:
        dest = Path(root) / repo.folder
        record = VerifiedRecord(dest)
        for i, remote in enumerate(files, 1):
            where = dict(repo=repo.repo_id, file=remote.name, index=i, count=len(files))
            if record.trusted(dest / remote.name, remote):
                reporter.emit("verified", **where, total=remote.size, skipped=True, hashed=False)
                continue
            if is_intact(dest / remote.name, remote):
                record.add(dest / remote.name, remote)
                reporter.emit("verified", **where, total=remote.size, skipped=True, hashed=True)
                continue
            reporter.progress(force=True, **where, done=0, total=remote.size)
            with _failing_as(repo):
                dest.mkdir(parents=True, exist_ok=True)
                fetch_file(repo, commit, dest, remote,
                           lambda n, w=where, t=remote.size: reporter.progress(**w, done=min(n, t), total=t))
            record.add(dest / remote.name, remote)
            reporter.progress(force=True, **where, done=remote.size, total=remote.size)
            reporter.emit("verified", **where, total=remote.size, skipped=False, hashed=True)
        total_files += len(files)
        reporter.emit("repo_done", repo=repo.repo_id, folder=str(dest), files=len(files))
    reporter.emit("done", files=total_files)
    return total_files


class _failing_as:
    """Context manager: any exception inside becomes a classified :class:`DownloadError` for ``repo``."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        err = classify(exc, self.repo.repo_id)
        err.repo = self.repo.repo_id
        raise err from None


def run(args: argparse.Namespace) -> int:
    """The ``download`` subcommand: exit code 0, or 3 after an ``error`` event."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # before huggingface_hub is imported
    reporter = Reporter(json_lines=args.json)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        reporter.emit("error", kind="unexpected", message="huggingface_hub is not installed in this Python.",
                      advice="Recreate the backend environment (Preferences › Create Backend Environment).")
        return EXIT_FAILED
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)   # its retry warnings: not for the user
    try:
        download(repos_for(args.what), Path(args.root), reporter)
    except DownloadError as err:
        reporter.emit("error", kind=err.kind, message=err.message, advice=err.advice, repo=err.repo)
        return EXIT_FAILED
    except KeyboardInterrupt:
        reporter.emit("error", kind="unexpected", message="interrupted", advice="Download again to resume.")
        return 130
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download`` subcommand (no torch, no huggingface_hub import here)."""
    p = subparsers.add_parser("download", help="download and verify the model weights (resumable)",
                              description="Token: the HF_TOKEN environment variable or 'hf auth login'.")
    p.add_argument("--root", required=True, metavar="DIR", help="folder the model folders are made in")
    p.add_argument("--what", choices=("all", "models", "rembg"), default="all",
                   help="all (default), the generation models only, or BiRefNet only")
    p.add_argument("--json", action="store_true", help="one JSON event per line (for the add-on)")
    p.set_defaults(func=run)
