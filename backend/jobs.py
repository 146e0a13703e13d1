"""Job folders: every job's inputs, resumable state and results on disk (stdlib + numpy only).

Layout under the cache directory (``<cache>/jobs/<job id>/``)::

    job.json            id, kind, status, created/updated times, settings, seed, source_job, error
    input/image.png     the input image (copied, or the PNG bytes the add-on sent)
    input/view_<k>.png  extra views of a multi-view generate job (k = 1, 2, ...; the first view is image.png)
    input/mesh.npz      texture jobs: vertices, faces, uvs (, matrix); guided generate jobs: guide_* arrays
    state/<name>.npz    conditioning / latents saved by the pipeline (e.g. cond, ss_latent, shape_slat)
    result/result.npz   the result arrays, result/meta.json its metadata

All writes are atomic (a temporary file in the same folder, fsync, then ``os.replace``), so a crash
at any point leaves either the old or the new file, never a torn one. Job ids are restricted to
``[A-Za-z0-9_.-]`` (no path separators, no leading dot) so a job can never write outside its folder.

Statuses: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``. A job found ``running``
after a crash is reported as ``interrupted`` by :meth:`Job.effective_status` when no live backend
owns it; its inputs (and any saved state) are still there, so Retry works, and Upscale reuses
``state/cond.npz`` plus the stored seed.

This module is imported by both the backend and the add-on (history list); it never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import numpy as np

__all__ = ["JobStore", "Job", "new_job_id", "valid_job_id", "atomic_write_bytes", "atomic_write_json",
           "atomic_save_npz", "load_npz", "STATUSES"]

STATUSES = ("queued", "running", "done", "failed", "cancelled")
_JOB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")


def new_job_id(prefix: str = "job") -> str:
    """A fresh, sortable, unique job id, e.g. ``job-20260101-120000-3f9a1c``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def valid_job_id(job_id: Any) -> bool:
    """True if ``job_id`` is a safe folder name (no separators, no leading dot, <= 96 chars)."""
    return isinstance(job_id, str) and bool(_JOB_ID.match(job_id)) and ".." not in job_id


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (Linux: read from /proc, without changing it; elsewhere set-and-restore)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object], honour_umask: bool = False) -> Path:
    """Let ``write`` fill a tmp file next to ``path`` (whose folder exists), fsync it, rename it to
    ``path``; on any error the tmp file is removed and the error re-raised. The file is private
    (0600, mkstemp's mode) unless ``honour_umask`` gives it a new file's usual mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if honour_umask:
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, honour_umask: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (tmp file in the same folder + fsync + rename); a user-facing
    output passes ``honour_umask`` (job files stay private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _replace_atomically(path, lambda fh: fh.write(data), honour_umask)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def atomic_save_npz(path: str | os.PathLike, arrays: Mapping[str, Any], *, compress: bool = False) -> Path:
    """Save ``arrays`` (name -> array) as an ``.npz`` atomically; no object arrays (no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.hasobject:
            raise TypeError(f"array {k!r} has an object dtype; refusing to pickle")
        clean[str(k)] = a
    return _replace_atomically(path, lambda fh: (np.savez_compressed if compress else np.savez)(fh, **clean))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` (``allow_pickle=False``) into a plain dict."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class Job:
    """One job folder. Cheap to construct; reads ``job.json`` on demand."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # paths
    @property
    def id(self) -> str:
        return self.root.name

    @property
    def meta_path(self) -> Path:
        return self.root / "job.json"

    @property
    def image_path(self) -> Path:
        return self.root / "input" / "image.png"

    def view_path(self, k: int) -> Path:
        """Extra view ``k`` (1-based) of a multi-view job."""
        return self.root / "input" / f"view_{int(k)}.png"

    def view_paths(self) -> list[Path]:
        """The stored extra views, in order."""
        out = []
        while self.view_path(len(out) + 1).is_file():
            out.append(self.view_path(len(out) + 1))
        return out

    @property
    def mesh_path(self) -> Path:
        return self.root / "input" / "mesh.npz"

    @property
    def result_path(self) -> Path:
        return self.root / "result" / "result.npz"

    @property
    def result_meta_path(self) -> Path:
        return self.root / "result" / "meta.json"

    @property
    def state_dir(self) -> Path:
        """The stage latents kept for re-runs and upscales."""
        return self.root / "state"

    def state_path(self, name: str) -> Path:
        if not valid_job_id(name):
            raise ValueError(f"bad state name {name!r}")
        return self.state_dir / f"{name}.npz"

    # metadata
    def meta(self) -> dict[str, Any]:
        """The parsed ``job.json`` ({} if missing or unreadable)."""
        try:
            return json.loads(self.meta_path.read_text("utf-8"))
        except (OSError, ValueError):
            return {}

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into ``job.json`` (atomically) and return the new metadata."""
        meta = self.meta()
        meta.update(fields)
        meta["id"] = self.id
        meta["updated"] = time.time()
        atomic_write_json(self.meta_path, meta)
        return meta

    def set_status(self, status: str, **fields: Any) -> dict[str, Any]:
        if status not in STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        return self.update(status=status, **fields)

    @property
    def status(self) -> str | None:
        return self.meta().get("status")

    def effective_status(self, live_jobs: set[str] | frozenset[str] = frozenset()) -> str | None:
        """``status``, except that a ``running``/``queued`` job no live backend owns is ``interrupted``."""
        st = self.status
        if st in ("running", "queued") and self.id not in live_jobs:
            return "interrupted"
        return st

    # inputs
    def save_image_bytes(self, data: bytes | memoryview | np.ndarray) -> Path:
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
        return atomic_write_bytes(self.image_path, data)

    def save_view_bytes(self, k: int, data: bytes | memoryview) -> Path:
        """Store extra view ``k`` (1-based; validated PNG bytes)."""
        return atomic_write_bytes(self.view_path(k), data)

    def save_image_file(self, src: str | os.PathLike) -> Path:
        """Copy the user's image into the job folder (so Retry works if the original moves)."""
        src = Path(src)
        if src.resolve() == self.image_path.resolve():
            return self.image_path
        return atomic_write_bytes(self.image_path, src.read_bytes())

    def save_mesh(self, arrays: Mapping[str, Any]) -> Path:
        return atomic_save_npz(self.mesh_path, arrays)

    def load_mesh(self) -> dict[str, np.ndarray]:
        return load_npz(self.mesh_path)

    # state (conditioning, latents)
    def save_state(self, name: str, arrays: Mapping[str, Any]) -> Path:
        return atomic_save_npz(self.state_path(name), arrays)

    def load_state(self, name: str) -> dict[str, np.ndarray] | None:
        p = self.state_path(name)
        return load_npz(p) if p.exists() else None

    def state_names(self) -> list[str]:
        d = self.root / "state"
        return sorted(p.stem for p in d.glob("*.npz")) if d.is_dir() else []

    # results
    def save_result(self, arrays: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
        """Store the result arrays and metadata; the metadata is written last (it marks completion)."""
        atomic_save_npz(self.result_path, arrays)
        atomic_write_json(self.result_meta_path, dict(meta or {}))
        return self.result_path

    def has_result(self) -> bool:
        return self.result_path.exists() and self.result_meta_path.exists()

    def load_result(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return load_npz(self.result_path), json.loads(self.result_meta_path.read_text("utf-8"))

    def __repr__(self) -> str:
        return f"Job({self.root})"


class JobStore:
    """All job folders under ``cache_dir/jobs``."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.root = self.cache_dir / "jobs"

    def path(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return self.root / job_id

    def get(self, job_id: str) -> Job | None:
        p = self.path(job_id)
        return Job(p) if (p / "job.json").exists() else None

    def open(self, job_id: str, *, kind: str | None = None, settings: Mapping[str, Any] | None = None,
             **fields: Any) -> Job:
        """Create the job folder if needed (status ``queued``) or reopen it; merge ``settings``."""
        job = Job(self.path(job_id))
        job.root.mkdir(parents=True, exist_ok=True)
        meta = job.meta()
        if not meta:
            meta = {"id": job_id, "created": time.time(), "status": "queued", "settings": {}}
        if kind is not None:
            meta["kind"] = kind
        if settings:
            meta["settings"] = {**meta.get("settings", {}), **dict(settings)}
        meta.update(fields)
        meta["updated"] = time.time()
        atomic_write_json(job.meta_path, meta)
        return job

    def list(self) -> list[Job]:
        """Every job with a ``job.json``, newest first (by creation time)."""
        if not self.root.is_dir():
            return []
        jobs = [Job(p) for p in self.root.iterdir() if p.is_dir() and (p / "job.json").exists()]
        return sorted(jobs, key=lambda j: j.meta().get("created", 0.0), reverse=True)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.list())

    def delete(self, job_id: str) -> bool:
        p = self.path(job_id)
        if p.is_dir():
            shutil.rmtree(p)
            return True
        return False
