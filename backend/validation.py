"""One validation layer for job requests (server and CLI): every field's type and range, before any work.

A request is the protocol message of a job (``generate`` / ``texture`` / ``upscale``) or the CLI's
equivalent dict. :func:`validate_request` checks each *known* field against the schema of its job
kind and returns a copy with normalised values (e.g. lower-cased enums); the first failure raises
:class:`~backend.errors.BadInput` whose ``field`` names the offending field (``stage_params.shape_slat.steps``).
Unknown fields pass through untouched (the fake test runner has its own), transport fields
(``type``, ``job``, ``arrays``) are checked by the server.

Also here: :func:`check_output_path` (the CLI's ``-o`` before anything runs) and
:func:`confined_path` (model-folder paths may not leave the folder, symlinks resolved).

Torch-free and Pillow-free (stdlib + numpy), so the server's reader thread can call it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .errors import BadInput
from .contract import BACKGROUND_MODES, GUIDE_FRAMES, MULTIVIEW_MODES, PIPELINE_TYPES, STAGE_PARAM_KEYS

__all__ = ["validate_request", "validate_arrays", "check_output_path", "confined_path", "PRECISIONS",
           "TEXTURE_SIZE_RANGE", "SEED_RANGE", "SCHEMAS"]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OUTPUTS = ("textures", "vertex_attrs", "mesh")
TEXTURE_SIZE_RANGE = (16, 8192)
#: seeds feed ``torch.Generator.manual_seed`` (a uint64)
SEED_RANGE = (0, (1 << 64) - 1)
MAX_TOKENS_RANGE = (1024, 1 << 24)
MAX_STEPS = 1000
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,2})?)$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,95}$")

Check = Callable[[str, Any], Any]


def _fail(field: str, expected: str, value: Any) -> BadInput:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return BadInput(f"Invalid request field '{field}': expected {expected}, got {shown}.", field=field)


# ------------------------------------------------------------------------------------------ checks


def integer(lo: int | None = None, hi: int | None = None, *, zero_ok: bool = False) -> Check:
    """An ``int`` (not a bool, not a float) in ``[lo, hi]``; ``zero_ok``: 0 also allowed ("default")."""
    rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    what = f"an integer{rng}" + (" (or 0 for the default)" if zero_ok else "")

    def check(field: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise _fail(field, what, v)
        v = int(v)
        if zero_ok and v == 0:
            return 0
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _fail(field, what, v)
        return v

    return check


def number(lo: float | None = None, hi: float | None = None) -> Check:
    """A finite real number (int or float, not a bool) in ``[lo, hi]``; NaN and ±Inf are refused."""
    rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
    what = f"a finite number{rng}"

    def check(field: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise _fail(field, what, v)
        f = float(v)
        if not math.isfinite(f) or (lo is not None and f < lo) or (hi is not None and f > hi):
            raise _fail(field, what, v)
        return f

    return check


def boolean(field: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _fail(field, "true or false", v)
    return bool(v)


def enum(*values: str, lower: bool = True) -> Check:
    what = "one of " + ", ".join(repr(x) for x in values)

    def check(field: str, v: Any) -> str:
        if not isinstance(v, str) or (v.lower() if lower else v) not in values:
            raise _fail(field, what, v)
        return v.lower() if lower else v

    return check


def path_string(field: str, v: Any) -> str:
    """A non-empty path string without NUL bytes (existence is checked where it is used)."""
    if not isinstance(v, str) or not v or "\x00" in v or len(v) > 4096:
        raise _fail(field, "a file or folder path (non-empty text)", v)
    return v


def device(field: str, v: Any) -> str:
    if not isinstance(v, str) or not _DEVICE.match(v.lower()):
        raise _fail(field, "'auto', 'cpu', 'cuda' or 'cuda:N'", v)
    return v.lower()


def job_id(field: str, v: Any) -> str:
    if not isinstance(v, str) or not _JOB_ID.match(v) or ".." in v:
        raise _fail(field, "a job id (letters, digits, '_', '.', '-')", v)
    return v


def texture_resolution(field: str, v: Any) -> int:
    v = integer(64, 2048)(field, v)
    if v % 64:
        raise _fail(field, "512, 1024 or 1536 (a multiple of 64 up to 2048)", v)
    return v


def _interval(field: str, v: Any) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _fail(field, "a pair [start, end] in [0, 1]", v)
    a, b = (number(0.0, 1.0)(f"{field}[{i}]", x) for i, x in enumerate(v))
    if a > b:
        raise _fail(field, "a pair [start, end] with start <= end", v)
    return [a, b]


#: sampler parameters of one stage (``pipeline.json`` ``*_sampler.params``); None = pipeline default
SAMPLER_PARAMS: dict[str, Check] = {
    "steps": integer(1, MAX_STEPS),
    "guidance_strength": number(0.0, 100.0),
    "guidance_rescale": number(0.0, 1.0),
    "guidance_interval": _interval,
    "rescale_t": number(0.01, 100.0),
}


def stage_params(field: str, v: Any) -> dict[str, dict[str, Any]]:
    """``{stage: {param: value}}`` with known stages and parameters, every value type- and range-checked."""
    if not isinstance(v, Mapping):
        raise _fail(field, "an object {stage: {parameter: value}}", v)
    out: dict[str, dict[str, Any]] = {}
    for stage, params in v.items():
        if stage not in STAGE_PARAM_KEYS:
            raise _fail(f"{field}.{stage}", "a stage among " + ", ".join(STAGE_PARAM_KEYS), stage)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise _fail(f"{field}.{stage}", "an object {parameter: value}", params)
        clean: dict[str, Any] = {}
        for key, val in params.items():
            if key not in SAMPLER_PARAMS:
                raise _fail(f"{field}.{stage}.{key}", "a parameter among " + ", ".join(SAMPLER_PARAMS), key)
            if val is not None:
                clean[key] = SAMPLER_PARAMS[key](f"{field}.{stage}.{key}", val)
        out[stage] = clean
    return out


# ------------------------------------------------------------------------------------------ schemas

_COMMON: dict[str, Check] = {
    "seed": integer(*SEED_RANGE),
    "stage_params": stage_params,
    "max_tokens": integer(*MAX_TOKENS_RANGE, zero_ok=True),
    "precision": enum(*PRECISIONS),
    "device": device,
    "low_vram": boolean,
    "preprocess": boolean,
    "no_store": boolean,
    "model_dir": path_string,
    "dinov3_dir": path_string,
    "ss_decoder_dir": path_string,
    "rembg_dir": path_string,
    "background": enum(*BACKGROUND_MODES),
    "remove_background": boolean,
}
_OUTPUT_FIELDS: dict[str, Check] = {
    "output": enum(*OUTPUTS),
    "texture_size": integer(*TEXTURE_SIZE_RANGE),
    "decimation_target": integer(4, 1 << 28, zero_ok=True),
}

MAX_VIEWS = 16


def image_list(field: str, v: Any) -> list[str]:
    """1 to :data:`MAX_VIEWS` image paths (the views of one object, the first one being ``image``)."""
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_VIEWS:
        raise _fail(field, f"a list of 1 to {MAX_VIEWS} image paths", v)
    return [path_string(f"{field}[{i}]", p) for i, p in enumerate(v)]


_GUIDE_FIELDS: dict[str, Check] = {
    "guide_strength": number(0.0, 1.0),
    "guide_frame": enum(*GUIDE_FRAMES),
}

#: per job kind: field -> check (None values mean "use the default" and are not checked)
SCHEMAS: dict[str, dict[str, Check]] = {
    "generate": {**_COMMON, **_OUTPUT_FIELDS, **_GUIDE_FIELDS, "image": path_string,
                 "pipeline_type": enum(*PIPELINE_TYPES), "images": image_list,
                 "multiview": enum(*MULTIVIEW_MODES)},
    "cutout": {**_COMMON, "image": path_string},
    "upscale": {**_COMMON, **_OUTPUT_FIELDS, "source_job": job_id, "target": enum("1536_cascade")},
    "texture": {**_COMMON, "image": path_string, "texture_size": integer(*TEXTURE_SIZE_RANGE),
                "resolution": texture_resolution},
}
REQUIRED: dict[str, tuple[str, ...]] = {"upscale": ("source_job",)}


def validate_request(msg: Mapping[str, Any], kind: str | None = None, *, partial: bool = False) -> dict[str, Any]:
    """A checked, normalised copy of the job request ``msg`` (``kind`` defaults to ``msg["type"]``).

    ``partial``: required fields may be missing (a retry takes them from the stored job).
    Raises :class:`BadInput` (with ``field``) on the first bad field.
    """
    kind = kind or msg.get("type")
    schema = SCHEMAS.get(kind)  # type: ignore[arg-type]
    if schema is None:
        raise BadInput(f"Unsupported job type {kind!r}.", field="type")
    out = dict(msg)
    for name, check in schema.items():
        v = out.get(name)
        if v is not None:
            out[name] = check(name, v)
    if not partial:
        for name in REQUIRED.get(kind, ()):
            if out.get(name) is None:
                raise BadInput(f"Missing request field '{name}' for a {kind} job.", field=name)
    if isinstance(out.get("arrays"), Mapping):
        validate_arrays(kind, out["arrays"])
    return out


VIEW_ARRAY_PREFIX = "view_png_"


def view_array_names(arrays: Mapping[str, Any]) -> list[str]:
    """The extra views sent as bytes (``view_png_1..N``), in order; a gap, a bad index or more than
    ``MAX_VIEWS - 1`` of them is a :class:`BadInput`."""
    names = [n for n in arrays if isinstance(n, str) and n.startswith(VIEW_ARRAY_PREFIX)]
    want = [f"{VIEW_ARRAY_PREFIX}{k}" for k in range(1, len(names) + 1)]
    if sorted(names) != sorted(want):
        raise BadInput(f"Extra view arrays must be named {VIEW_ARRAY_PREFIX}1..N without gaps; got {sorted(names)}.",
                       field=f"arrays.{sorted(names)[0]}")
    if len(names) > MAX_VIEWS - 1:
        raise BadInput(f"At most {MAX_VIEWS} views (the image and {MAX_VIEWS - 1} extra views).",
                       field=f"arrays.{VIEW_ARRAY_PREFIX}{MAX_VIEWS}")
    return want


def validate_arrays(kind: str, arrays: Mapping[str, Any]) -> None:
    """Shapes and dtypes of a request's arrays (mesh of a texture job, image bytes)."""
    def arr(name: str, ok: bool, expected: str) -> None:
        if not ok:
            a = arrays[name]
            got = f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}"
            raise BadInput(f"Invalid request array '{name}': expected {expected}, got {got}.", field=f"arrays.{name}")

    def kind_of(a: Any) -> str:
        return np.asarray(a).dtype.kind

    if "image_png" in arrays:
        a = np.asarray(arrays["image_png"])
        arr("image_png", a.dtype == np.uint8 and a.ndim == 1 and a.size > 0, "non-empty uint8 bytes")
    views = view_array_names(arrays)
    if views and kind != "generate":
        raise BadInput(f"Only a generate job takes extra views, not {kind}.", field=f"arrays.{views[0]}")
    for name in views:
        a = np.asarray(arrays[name])
        arr(name, a.dtype == np.uint8 and a.ndim == 1 and a.size > 0, "non-empty uint8 bytes")
    if kind == "generate":
        if ("guide_vertices" in arrays) != ("guide_faces" in arrays):
            raise BadInput("A guide mesh needs both 'guide_vertices' and 'guide_faces'.", field="arrays.guide_faces")
        if "guide_vertices" in arrays:
            a = np.asarray(arrays["guide_vertices"])
            arr("guide_vertices", a.ndim == 2 and a.shape[1] == 3 and kind_of(a) == "f", "float [V, 3]")
            a = np.asarray(arrays["guide_faces"])
            arr("guide_faces", a.ndim == 2 and a.shape[1] == 3 and kind_of(a) in "iu", "integer [F, 3]")
        if "guide_matrix" in arrays:
            a = np.asarray(arrays["guide_matrix"])
            arr("guide_matrix", a.shape == (4, 4) and kind_of(a) == "f", "float [4, 4]")
    if kind != "texture":
        return
    if "vertices" in arrays:
        a = np.asarray(arrays["vertices"])
        arr("vertices", a.ndim == 2 and a.shape[1] == 3 and kind_of(a) == "f", "float [V, 3]")
    if "faces" in arrays:
        a = np.asarray(arrays["faces"])
        arr("faces", a.ndim == 2 and a.shape[1] == 3 and kind_of(a) in "iu", "integer [F, 3]")
    if "uvs" in arrays:
        a = np.asarray(arrays["uvs"])
        arr("uvs", a.shape[-1:] == (2,) and a.ndim in (2, 3) and kind_of(a) == "f", "float [N, 2] or [F, 3, 2]")
    if "matrix" in arrays:
        a = np.asarray(arrays["matrix"])
        arr("matrix", a.shape == (4, 4) and kind_of(a) == "f", "float [4, 4]")


# ------------------------------------------------------------------------------------------ paths


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] = (".glb",)) -> Path:
    """The CLI's output file, checked before anything runs: not a folder, a writable (or creatable)
    parent folder, one of ``suffixes``. Returns the absolute path."""
    p = Path(path).expanduser()
    if str(path).endswith(os.sep) or p.is_dir():
        raise BadInput(f"Output {path} is a folder; give a file name, e.g. {Path(path) / ('out' + suffixes[0])}.",
                       field="output")
    if suffixes and p.suffix.lower() not in suffixes:
        raise BadInput(f"Output {path}: the file name must end in {' or '.join(suffixes)}.", field="output")
    parent = p.absolute().parent
    existing = next((d for d in (parent, *parent.parents) if d.exists()), None)
    if existing is None or not existing.is_dir():
        raise BadInput(f"Output {path}: {existing} is not a folder.", field="output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"Output {path}: the folder {existing} is not writable.", field="output")
    if p.exists() and not os.access(p, os.W_OK):
        raise BadInput(f"Output {path} exists and is not writable.", field="output")
    return p.absolute()


def _allowed_roots(base: Path) -> list[Path]:
    """Where files of the model folder ``base`` may really live: the folder itself and, for a Hugging
    Face cache snapshot (``models--org--name/snapshots/<rev>``), that repository's own store."""
    roots = [base.resolve()]
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith("models--"):
        roots.append(base.parent.parent.resolve())
    return roots


def confined_path(root: str | os.PathLike, rel: Any, what: str, suffixes: tuple[str, ...] = ("",)) -> Path:
    """``root / rel``, refused unless it stays inside ``root``: lexically (no absolute path, no ``../``
    escape) and, for each existing ``rel + suffix`` file, after resolving symlinks (a Hugging Face
    snapshot may point into its own repository's blob store, nowhere else).

    ``rel`` comes from a config file (``pipeline.json`` models): anything else is a :class:`BadInput`
    naming ``what`` (the config entry).
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise BadInput(f"{what}: expected a relative path inside the model folder, got {rel!r}.", field=what)
    norm = os.path.normpath(rel.replace("\\", "/"))
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep) or norm.startswith("../"):
        raise BadInput(f"{what}: {rel!r} points outside the model folder {root}; refusing to load it.",
                       advice="Use the official pipeline.json (paths relative to the model folder).", field=what)
    base = Path(root)
    target = base / norm
    roots = _allowed_roots(base)
    for sfx in suffixes:
        f = Path(f"{target}{sfx}")
        if f.exists() or f.is_symlink():
            real = f.resolve()
            if not any(real == r or r in real.parents for r in roots):
                raise BadInput(f"{what}: {f.name} links to {real}, outside the model folder {base}; "
                               f"refusing to load it.", field=what)
    return target
