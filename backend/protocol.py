"""The pipe protocol between the Blender add-on and the backend process (both sides use this module).

Stdlib + numpy only (numpy 1.26 and 2.x, Python 3.11-3.13); no pickle anywhere.

Frame layout (all integers little-endian)::

    +---------+---------+---------+------------+-------------+
    | magic   | version | flags   | header_len | payload_len |   fixed header, 20 bytes
    | 4s      | u16     | u16     | u32        | u64         |   struct "<4sHHIQ"
    +---------+---------+---------+------------+-------------+
    | JSON header (UTF-8, header_len bytes): a JSON object    |
    +---------------------------------------------------------+
    | payload (payload_len bytes): the raw array bytes        |
    +---------------------------------------------------------+

The JSON header is a message: ``{"type": <str>, ...fields, "arrays": [spec, ...]}`` where each array
spec is ``{"name", "dtype" (numpy ``.str``, e.g. "<f4"), "shape", "offset", "nbytes"}``; offsets are
relative to the payload start and 64-byte aligned by the sender.

Messages are plain dicts in Python. On send, ``msg["arrays"]`` may be a ``{name: ndarray | bytes}``
mapping; the arrays travel as the payload. On receive, ``msg["arrays"]`` is a ``{name: ndarray}``
dict of zero-copy ``np.frombuffer`` views into one freshly allocated payload buffer (writable).

Everything the receiver gets from the wire is validated *before* anything is allocated: the magic,
the protocol version, ``header_len <= max_header``, ``payload_len <= max_payload``, the JSON header
(object, known ``type``), and every array spec (allowed dtype, ``ndim``, non-negative dims, ``nbytes ==
prod(shape) * itemsize``, inside the payload, no overlap). Bad frames raise :class:`ProtocolError`;
:class:`FrameReader` then skips the bad frame (or re-synchronises on the next magic) so one bad frame
never kills either side. A frame whose fixed header already breaks a limit (payload or header size)
is never read or skipped by its declared lengths (the bytes may never come): the reader reports it
at once, with the job id when the header is at hand, and re-synchronises on the next magic.

Message types
-------------
backend -> add-on: ``hello`` ``status`` ``progress`` ``result`` ``error`` ``cancelled`` ``log``
``pong``.  add-on -> backend: ``generate`` ``texture`` ``upscale`` ``cancel`` ``unload``
``shutdown`` ``ping`` (and ``auth``, the first frame of a TCP connection).  See :data:`BACKEND_MESSAGES` / :data:`CLIENT_MESSAGES` and the module
``docs`` in :func:`describe_messages`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np

__all__ = [
    "MAGIC", "PROTOCOL_VERSION", "FIXED", "FIXED_SIZE", "ALIGN", "ALLOWED_DTYPES",
    "BACKEND_MESSAGES", "CLIENT_MESSAGES", "MESSAGE_TYPES", "JOB_MESSAGES", "ERROR_KINDS", "STAGES",
    "DEFAULT_MAX_HEADER", "DEFAULT_MAX_PAYLOAD", "MAX_NDIM",
    "ProtocolError", "encode", "decode", "FrameReader", "FrameWriter", "enlarge_pipe",
]

MAGIC = b"T2P1"
PROTOCOL_VERSION = 1
FIXED = struct.Struct("<4sHHIQ")
FIXED_SIZE = FIXED.size  # 20
ALIGN = 64
MAX_NDIM = 8
DEFAULT_MAX_HEADER = 1 << 20            # 1 MiB of JSON
DEFAULT_MAX_PAYLOAD = 8 << 30           # 8 GiB of arrays in one frame
_MAX_ARRAYS = 256
_SKIP_CHUNK = 1 << 20
# Frames whose declared lengths are above this are not skipped byte by byte: the reader scans for
# the next magic instead (a corrupted length could otherwise make it wait for exabytes).
_MAX_SKIP = 1 << 34

# numpy dtype strings accepted on the wire (little-endian or byte-sized only; never object/void).
ALLOWED_DTYPES: frozenset[str] = frozenset({
    "|b1", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8",
})

BACKEND_MESSAGES: frozenset[str] = frozenset(
    {"hello", "status", "progress", "result", "error", "cancelled", "log", "pong"})
CLIENT_MESSAGES: frozenset[str] = frozenset(
    {"generate", "texture", "upscale", "cutout", "cancel", "unload", "shutdown", "ping", "auth"})
MESSAGE_TYPES: frozenset[str] = BACKEND_MESSAGES | CLIENT_MESSAGES
JOB_MESSAGES: frozenset[str] = frozenset({"generate", "texture", "upscale", "cutout"})
# error kinds; "crashed" is made by the add-on's client when the backend process dies under a job
ERROR_KINDS: tuple[str, ...] = (
    "oom", "missing_dependency", "missing_weights", "bad_input", "cancelled", "internal", "protocol", "crashed")
# Stage names the pipelines report in ``progress`` (informational: the UI maps them to labels; an
# unknown stage name is still valid). Cascades use shape_slat_lr / upsample / shape_slat_hr.
STAGES: tuple[str, ...] = (
    "preprocess", "cond", "sparse_structure", "shape_slat", "shape_slat_lr", "upsample", "shape_slat_hr",
    "tex_slat", "decode", "postprocess", "unwrap", "bake")


_HAVE_READV = hasattr(os, "readv")


class ProtocolError(ValueError):
    """A frame violates the protocol (bad magic, version, size, JSON, dtype, shape, truncation).

    ``fatal`` is True when the stream cannot continue (truncated at EOF); otherwise the reader has
    already skipped the bad frame and the next :meth:`FrameReader.read` may succeed.
    """

    def __init__(self, message: str, *, fatal: bool = False, job: str | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.job = job


# --------------------------------------------------------------------------------------------------
# encoding


def _as_wire_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a C-contiguous array of an allowed little-endian dtype (copies only if needed)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(value, dtype=np.uint8)
    else:
        arr = np.asarray(value)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {arr.dtype.str} is not allowed on the wire")
    if arr.ndim > MAX_NDIM:
        raise ProtocolError(f"array {name!r}: {arr.ndim} dimensions (max {MAX_NDIM})")
    return arr


def encode(msg: Mapping[str, Any]) -> list[memoryview | bytes]:
    """Encode ``msg`` into a list of buffers to write in order (no payload concatenation).

    ``msg["type"]`` must be a known message type; ``msg.get("arrays")`` may map names to arrays
    (or bytes, sent as uint8). The other fields must be JSON-serialisable.
    """
    mtype = msg.get("type")
    if mtype not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {mtype!r}")
    header = {k: v for k, v in msg.items() if k != "arrays"}
    arrays = msg.get("arrays") or {}
    if not isinstance(arrays, Mapping):
        raise ProtocolError("'arrays' must be a mapping of name -> array")
    specs: list[dict[str, Any]] = []
    bufs: list[memoryview | bytes] = []
    pieces: list[memoryview | bytes] = []
    offset = 0
    for name, value in arrays.items():
        arr = _as_wire_array(value, str(name))
        pad = (-offset) % ALIGN
        if pad:
            pieces.append(bytes(pad))
            offset += pad
        specs.append({"name": str(name), "dtype": arr.dtype.str, "shape": list(arr.shape),
                      "offset": offset, "nbytes": int(arr.nbytes)})
        if arr.nbytes:
            pieces.append(memoryview(arr).cast("B") if arr.ndim else memoryview(arr.reshape(1)).cast("B"))
        offset += int(arr.nbytes)
    if specs:
        header["arrays"] = specs
    hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    bufs.append(FIXED.pack(MAGIC, PROTOCOL_VERSION, 0, len(hbytes), offset))
    bufs.append(hbytes)
    bufs.extend(pieces)
    return bufs


# --------------------------------------------------------------------------------------------------
# validation / decoding


def _check_fixed(fixed: bytes, max_header: int, max_payload: int) -> tuple[int, int]:
    magic, version, _flags, hlen, plen = FIXED.unpack(fixed)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks "
                            f"{PROTOCOL_VERSION}); the add-on and backend versions differ")
    if hlen == 0 or hlen > max_header:
        raise ProtocolError(f"JSON header of {hlen} bytes (limit {max_header})")
    if plen > max_payload:
        raise ProtocolError(f"payload of {plen} bytes is over the limit of {max_payload} bytes")
    return hlen, plen


def _parse_header(hbytes: bytes | memoryview, plen: int) -> tuple[dict[str, Any], list[tuple[str, np.dtype, tuple[int, ...], int, int]]]:
    try:
        header = json.loads(bytes(hbytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"JSON header does not parse: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("JSON header is not an object")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        job = header.get("job") if isinstance(header.get("job"), str) else None
        raise ProtocolError(f"unknown message type {mtype!r}", job=job)
    raw_specs = header.pop("arrays", None) or []
    if not isinstance(raw_specs, list) or len(raw_specs) > _MAX_ARRAYS:
        raise ProtocolError("'arrays' must be a list of at most %d specs" % _MAX_ARRAYS)
    specs = []
    names: set[str] = set()
    for spec in raw_specs:
        specs.append(_check_spec(spec, plen, names))
    # no overlaps (sorted by offset)
    end = 0
    for _n, _dt, _sh, off, nb in sorted(specs, key=lambda s: s[3]):
        if nb and off < end:
            raise ProtocolError("array byte ranges overlap")
        end = max(end, off + nb)
    return header, specs


def _check_spec(spec: Any, plen: int, names: set[str]) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    if not isinstance(spec, dict):
        raise ProtocolError("array spec is not an object")
    name, dstr, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    off, nb = spec.get("offset"), spec.get("nbytes")
    if not isinstance(name, str) or not name or len(name) > 128 or name in names:
        raise ProtocolError(f"bad or duplicate array name {name!r}")
    names.add(name)
    if not isinstance(dstr, str) or dstr not in ALLOWED_DTYPES:
        raise ProtocolError(f"array {name!r}: dtype {dstr!r} is not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise ProtocolError(f"array {name!r}: bad shape {shape!r}")
    if type(off) is not int or type(nb) is not int or off < 0 or nb < 0:
        raise ProtocolError(f"array {name!r}: bad offset/nbytes")
    dtype = np.dtype(dstr)
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != nb:
        raise ProtocolError(f"array {name!r}: nbytes {nb} != prod{tuple(shape)} * {dtype.itemsize}")
    if off + nb > plen:
        raise ProtocolError(f"array {name!r}: bytes {off}..{off + nb} outside the {plen}-byte payload")
    return name, dtype, tuple(shape), off, nb


def _peek_job(hbytes: bytes | bytearray) -> str | None:
    """The ``job`` field of a rejected frame's JSON header, if it has one (for error reports)."""
    try:
        job = json.loads(bytes(hbytes).decode("utf-8")).get("job")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return job if isinstance(job, str) else None


def _attach_arrays(header: dict[str, Any], specs, payload) -> dict[str, Any]:
    if specs:
        header["arrays"] = {
            name: np.frombuffer(payload, dtype=dt, count=nb // dt.itemsize, offset=off).reshape(shape)
            if nb else np.zeros(shape, dtype=dt)
            for name, dt, shape, off, nb in specs}
    return header


def decode(data: bytes | bytearray | memoryview, *, max_header: int = DEFAULT_MAX_HEADER,
           max_payload: int = DEFAULT_MAX_PAYLOAD) -> dict[str, Any]:
    """Decode exactly one complete frame held in memory (arrays are views into ``data``)."""
    mv = memoryview(data).cast("B")
    if len(mv) < FIXED_SIZE:
        raise ProtocolError("truncated frame (fixed header)", fatal=True)
    hlen, plen = _check_fixed(bytes(mv[:FIXED_SIZE]), max_header, max_payload)
    if len(mv) != FIXED_SIZE + hlen + plen:
        raise ProtocolError(f"frame is {len(mv)} bytes, header says {FIXED_SIZE + hlen + plen}",
                            fatal=len(mv) < FIXED_SIZE + hlen + plen)
    header, specs = _parse_header(mv[FIXED_SIZE:FIXED_SIZE + hlen], plen)
    return _attach_arrays(header, specs, mv[FIXED_SIZE + hlen:])


# --------------------------------------------------------------------------------------------------
# streams


def _fileno(obj: Any) -> int | None:
    if isinstance(obj, int):
        return obj
    try:
        return obj.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def enlarge_pipe(fd: int, size: int = 1 << 20) -> int:
    """Grow a Linux pipe's kernel buffer (fewer context switches for big frames). Returns the size
    in effect, or 0 where that is not possible (other OSes, not a pipe, over the system limit)."""
    try:
        import fcntl
        set_sz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
        try:
            with open("/proc/sys/fs/pipe-max-size") as fh:
                size = min(size, int(fh.read()))
        except OSError:
            pass
        return int(fcntl.fcntl(fd, set_sz, size))
    except (ImportError, OSError, ValueError):
        return 0


class FrameReader:
    """Reads frames from a binary stream (a raw/unbuffered file object or an fd number).

    ``read()`` returns the next message dict, ``None`` at a clean end of stream (EOF between
    frames), and raises :class:`ProtocolError` for a bad frame. After a non-fatal error the bad
    frame has been skipped (or, when its lengths are not trustworthy, the reader scans for the next
    magic on the following call), so the caller may report the error and keep reading.
    Not thread-safe: use one reader thread.
    """

    def __init__(self, stream: BinaryIO | int, *, max_header: int = DEFAULT_MAX_HEADER,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._stream = stream
        self._fd = stream if isinstance(stream, int) else None
        self.max_header = max_header
        self.max_payload = max_payload
        self._pending = bytearray()   # bytes read ahead while re-synchronising
        self._resync = False
        self.frames = 0
        self.errors = 0

    # -- low level
    def _readinto(self, mv: memoryview) -> int:
        if self._pending:
            n = min(len(mv), len(self._pending))
            mv[:n] = self._pending[:n]
            del self._pending[:n]
            return n
        if self._fd is not None:
            if _HAVE_READV:
                return os.readv(self._fd, [mv])
            data = os.read(self._fd, min(len(mv), 1 << 20))   # Windows: no readv
            mv[:len(data)] = data
            return len(data)
        n = self._stream.readinto(mv)  # type: ignore[union-attr]
        return 0 if n is None else n

    def _read_exact(self, mv: memoryview) -> int:
        """Fill ``mv``; returns the number of bytes read (< len only at EOF)."""
        got, total = 0, len(mv)
        while got < total:
            n = self._readinto(mv[got:])
            if n == 0:
                break
            got += n
        return got

    def _skip(self, n: int) -> bool:
        scratch = memoryview(bytearray(min(n, _SKIP_CHUNK) or 1))
        while n > 0:
            k = self._readinto(scratch[:min(n, len(scratch))])
            if k == 0:
                return False
            n -= k
        return True

    def _peek_job_available(self, hlen: int) -> str | None:
        """The job id of a rejected frame's JSON header, from the bytes already read ahead plus at
        most one read of what the stream has now (never waits for the whole header); every byte
        stays pending, so the re-synchronisation sees it."""
        want = hlen - len(self._pending)
        if want > 0:
            try:
                if self._fd is not None:
                    self._pending += os.read(self._fd, want)
                else:
                    chunk = bytearray(want)
                    n = self._stream.readinto(chunk) or 0  # type: ignore[union-attr]
                    self._pending += chunk[:n]
            except OSError:
                pass
        return _peek_job(bytes(self._pending[:hlen]))

    def _scan_to_magic(self) -> bool:
        """Discard bytes up to the next MAGIC (kept pending). False at EOF."""
        buf = bytearray(self._pending)
        self._pending.clear()
        chunk = memoryview(bytearray(65536))
        while True:
            idx = buf.find(MAGIC)
            if idx >= 0:
                self._pending = buf[idx:]
                return True
            keep = buf[-(len(MAGIC) - 1):] if len(buf) >= len(MAGIC) else buf
            buf = bytearray(keep)
            n = self._readinto(chunk)
            if n == 0:
                return False
            buf += chunk[:n]

    # -- public
    def read(self) -> dict[str, Any] | None:
        """The next message, ``None`` at clean EOF; raises :class:`ProtocolError` on a bad frame."""
        if self._resync:
            self._resync = False
            if not self._scan_to_magic():
                return None
        fixed = bytearray(FIXED_SIZE)
        got = self._read_exact(memoryview(fixed))
        if got == 0:
            return None
        if got < FIXED_SIZE:
            self.errors += 1
            raise ProtocolError(f"truncated frame: stream ended after {got} of {FIXED_SIZE} header bytes",
                                fatal=True)
        magic, version, _flags, hlen, plen = FIXED.unpack(fixed)
        if (magic != MAGIC or version != PROTOCOL_VERSION or not 0 < hlen <= self.max_header
                or plen > min(self.max_payload, _MAX_SKIP)):
            # Untrustworthy framing (another protocol version frames differently; a false magic met
            # while re-synchronising rarely has our version) or a payload over the limit: nothing of
            # it is read or skipped by its declared lengths (the payload may never come, and later
            # frames - a cancel - must still get through). Drop the first byte and look for the next
            # magic on the next call.
            self.errors += 1
            job = self._peek_job_available(hlen) if magic == MAGIC and 0 < hlen <= self.max_header else None
            self._pending[:0] = fixed[1:]
            self._resync = True
            try:
                _check_fixed(bytes(fixed), self.max_header, self.max_payload)  # raises the precise error
            except ProtocolError as exc:
                exc.job = job
                raise
            raise ProtocolError(f"declared payload of {plen} bytes is over the limit of {self.max_payload} bytes",
                                job=job)
        hbuf = bytearray(hlen)
        if self._read_exact(memoryview(hbuf)) < hlen:
            self.errors += 1
            raise ProtocolError("truncated frame: stream ended inside the JSON header", fatal=True)
        try:
            _check_fixed(bytes(fixed), self.max_header, self.max_payload)   # version, payload limit
            header, specs = _parse_header(hbuf, plen)
        except ProtocolError as exc:
            # trustworthy framing, unacceptable content: skip exactly this frame, keep its job id
            self.errors += 1
            if exc.job is None:
                exc.job = _peek_job(hbuf)
            if not self._skip(plen):
                raise ProtocolError(f"{exc} (and the stream ended inside that frame)", fatal=True,
                                    job=exc.job) from None
            raise
        # validated: now (and only now) allocate the payload; np.empty gives an aligned buffer
        payload = np.empty(plen, dtype=np.uint8)
        if plen and self._read_exact(memoryview(payload)) < plen:
            self.errors += 1
            raise ProtocolError(f"truncated frame: stream ended inside the {plen}-byte payload", fatal=True)
        self.frames += 1
        return _attach_arrays(header, specs, payload)

    def __iter__(self):
        while True:
            msg = self.read()
            if msg is None:
                return
            yield msg


class FrameWriter:
    """Writes frames to an fd or binary file object; thread-safe (one lock per writer).

    On POSIX the buffers go out with ``os.writev`` straight from the arrays' memory (partial
    writes are resumed without copying); elsewhere each buffer is written in turn.
    """

    def __init__(self, stream: BinaryIO | int) -> None:
        self._stream = stream
        self._fd = _fileno(stream)
        if not isinstance(stream, int) and hasattr(stream, "flush"):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self._lock = threading.Lock()
        self._use_writev = hasattr(os, "writev") and self._fd is not None
        self.frames = 0
        self.bytes = 0

    def _write_all(self, bufs: Iterable[memoryview | bytes]) -> None:
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        if self._use_writev:
            fd = self._fd
            iov_max = 512
            while views:
                n = os.writev(fd, views[:iov_max])  # type: ignore[arg-type]
                self.bytes += n
                while views and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
        else:
            stream = self._stream
            for v in views:
                if isinstance(stream, int):
                    while len(v):
                        k = os.write(stream, v)
                        v = v[k:]
                        self.bytes += k
                else:
                    stream.write(v)  # type: ignore[union-attr]
                    self.bytes += len(v)
            if not isinstance(stream, int):
                stream.flush()  # type: ignore[union-attr]

    def send(self, msg: Mapping[str, Any]) -> None:
        """Encode and write one message (raises :class:`ProtocolError` before writing anything
        if the message cannot be encoded; ``OSError``/``BrokenPipeError`` if the pipe is gone)."""
        bufs = encode(msg)
        with self._lock:
            self._write_all(bufs)
            self.frames += 1

    def write_encoded(self, bufs: list[memoryview | bytes]) -> None:
        """Write the buffers of one frame made by :func:`encode` (lets a caller encode in one
        thread and write in another)."""
        with self._lock:
            self._write_all(bufs)
            self.frames += 1

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes (tests use this to inject garbage)."""
        with self._lock:
            self._write_all([data])


def describe_messages() -> dict[str, str]:
    """Human documentation of each message type's fields (also used by the docs/tests)."""
    return {
        "hello": "backend->add-on, first frame: protocol, backend_version, python, numpy, pid, platform",
        "status": "state: starting|loading|ready|busy|stopping, loaded (bool), job, queue [ids], "
                  "device info (torch, cuda, device, gpu, vram_total, vram_used) when known",
        "progress": "job, stage (see STAGES), step, total, elapsed_s (job), stage_elapsed_s, eta_s (stage)",
        "result": "job, kind (mesh|textures|...), meta {...}, arrays {vertices, faces, ...}",
        "error": "job (or null), kind (see ERROR_KINDS), message, advice, traceback_tail, log_tail, "
                 "field (bad_input: the request field at fault, when known)",
        "cancelled": "job, stage, step (where it stopped), requested_step (where the cancel found it; null if not running)",
        "log": "level, text (throttled)",
        "pong": "echo of the ping's fields and arrays",
        "generate": "job, image (path) or arrays.image_png (bytes), extra views images[1:] (paths) or "
                    "arrays.view_png_1..N (bytes), seed, pipeline_type, background "
                    "(auto|remove|keep), settings...",
        "cutout": "job, image or arrays.image_png, background: runs only preprocessing; result arrays.preprocessed",
        "texture": "job, image, seed, ..., arrays: vertices, faces, uvs",
        "upscale": "job, source_job, target",
        "cancel": "job (omit: everything)",
        "unload": "free models and GPU memory",
        "shutdown": "cancel everything and exit",
        "ping": "any fields/arrays, answered by pong",
        "auth": "token: the first frame of a TCP connection (backend.transport); no payload",
    }
