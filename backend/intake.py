"""Job inputs checked before anything is stored: the input image (server side).

The server reads the image a request names (a path, or the ``image_png`` bytes the add-on sends)
with :func:`read_image_source` — a regular file, at most :data:`MAX_IMAGE_BYTES`, starting with the
signature of an image format — and the runner's ``prepare_image`` then decodes and re-encodes it
(:func:`validated_png`: format, size, decompression-bomb guard, 16-bit and EXIF handling). Only
that result is written to the job folder, so a file that is not an image (``/proc/self/environ``,
a key file) is never copied anywhere.

Stdlib only at import time; :func:`validated_png` imports Pillow.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path
from typing import Callable

from .errors import BadInput

__all__ = ["MAX_IMAGE_BYTES", "IMAGE_SIGNATURES", "sniff_image", "read_image_source", "validated_png"]

#: largest accepted image file (an 8k×8k 16-bit RGBA PNG is ~512 MiB uncompressed, far less on disk)
MAX_IMAGE_BYTES = 256 << 20
#: leading bytes of the formats the pipelines accept (PIL decodes each)
IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "PNG": (b"\x89PNG\r\n\x1a\n", b"\x89PNG"),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
    "WEBP": (b"RIFF",),
}


def sniff_image(head: bytes) -> str | None:
    """The image format ``head`` (the first bytes of a file) starts with, or None."""
    for fmt, sigs in IMAGE_SIGNATURES.items():
        if any(head.startswith(s) for s in sigs):
            if fmt == "WEBP" and head[8:12] != b"WEBP":
                continue
            return fmt
    return None


def read_image_source(path: str | os.PathLike, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of the image file ``path``: a regular file of at most ``limit`` bytes that starts
    like an image. Raises :class:`BadInput` (field ``image``) otherwise; nothing is written."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # never hang on a FIFO
    except FileNotFoundError:
        raise BadInput(f"Input image not found: {p}", field="image") from None
    except OSError as e:
        raise BadInput(f"Cannot open the input image {p}: {e.strerror or e}", field="image") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or str(p.resolve()).startswith(("/proc/", "/sys/", "/dev/")):
            raise BadInput(f"Input image {p} is not a regular image file.", field="image")
        if st.st_size > limit:
            raise BadInput(f"Input image {p} is {st.st_size / 2**20:.0f} MiB, more than the "
                           f"{limit / 2**20:.0f} MiB allowed.", field="image")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise BadInput(f"Cannot read the input image {p}: {e.strerror or e}", field="image") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BadInput(f"Input image {p} is more than the {limit / 2**20:.0f} MiB allowed.", field="image")
    check_image_bytes(data, str(p))
    return data


def check_image_bytes(data: bytes | memoryview, name: str = "the input image") -> None:
    """:class:`BadInput` unless ``data`` starts with the signature of an accepted image format."""
    head = bytes(memoryview(data)[:16])
    if not head:
        raise BadInput(f"{name} is empty.", field="image")
    if sniff_image(head) is None:
        raise BadInput(f"{name} is not an image (PNG, JPEG, WebP, TIFF, BMP or GIF expected).", field="image")


#: images with more pixels than this are decoded in a killable child when a cancel check is given
CHILD_PIXELS = 4096 * 4096
#: how often the child is polled (and ``check`` called)
POLL_S = 0.05
_CHILD = r"""
import importlib, sys
sys.path.insert(0, sys.argv[1])
intake = importlib.import_module(sys.argv[2] + ".intake")
try:
    out = intake.validated_png(open(sys.argv[3], "rb").read())
except intake.BadInput as e:
    open(sys.argv[4] + ".err", "w", encoding="utf-8").write(e.message)
    sys.exit(3)
open(sys.argv[4], "wb").write(out)
"""


def validated_png(data: bytes | memoryview, check: Callable[[], None] | None = None) -> bytes:
    """Decode ``data`` completely with every guard of :func:`backend.pipelines.preprocess.load_image`
    (format, pixel limit / decompression bomb, EXIF orientation, 16-bit greyscale scaled to 8 bit)
    and re-encode it as PNG (alpha kept). The job folder stores only this.

    ``check()`` (may raise, e.g. a cancel): an image over :data:`CHILD_PIXELS` is then handled in a
    child process polled with ``check`` and killed when it raises (a big decode is one long C call).
    """
    from PIL import Image

    from .pipelines.preprocess import MAX_PIXELS, load_image

    check_image_bytes(data)
    if check is not None:
        try:  # the size from the header only (the first MiB holds it for every accepted format)
            w, h = Image.open(io.BytesIO(bytes(data[:1 << 20]))).size
        except Exception:  # noqa: BLE001 - the full decode below reports it properly
            w = h = 0
        if CHILD_PIXELS < w * h <= MAX_PIXELS:   # (a bomb is refused below before any decoding)
            return _validated_png_in_child(data, check)
    try:
        img = load_image(bytes(data))
    except BadInput as e:
        e.field = e.field or "image"
        raise
    if img.mode in ("P", "PA") or img.mode not in ("RGB", "RGBA", "L", "LA"):
        has_alpha = "A" in img.getbands() or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif "transparency" in img.info and img.mode in ("RGB", "L"):
        img = img.convert("RGBA")
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _validated_png_in_child(data: bytes | memoryview, check: Callable[[], None]) -> bytes:
    import tempfile

    from .killable import package_root, run_killable

    root, pkg = package_root()
    with tempfile.TemporaryDirectory(prefix="trellis2-intake-") as tmp:
        src, dst, log = (os.path.join(tmp, n) for n in ("in.bin", "out.png", "log.txt"))
        with open(src, "wb") as fh:
            fh.write(data)
        rc = run_killable(["-c", _CHILD, root, pkg, src, dst], check, log, POLL_S)
        if rc == 3 and os.path.exists(dst + ".err"):
            with open(dst + ".err", encoding="utf-8") as fh:
                raise BadInput(fh.read(), field="image")
        if rc != 0 or not os.path.exists(dst):
            with open(log, "rb") as fh:
                detail = fh.read()[-300:].decode("utf-8", "replace").strip()
            how = f"signal {-rc}" if rc < 0 else f"code {rc}"
            raise BadInput(f"The input image could not be decoded ({how}){': ' + detail if detail else ''}.",
                           field="image")
        with open(dst, "rb") as fh:
            return fh.read()
