"""TRELLIS.2 models and the checkpoint loader.

A checkpoint is the pair ``<stem>.json`` (``{"name": <class name>, "args": {...}}``) and
``<stem>.safetensors`` (the state dict under the official key names), exactly as in
``microsoft/TRELLIS.2-4B/ckpts``. :func:`from_pretrained` builds the class named in the JSON on the
``meta`` device (no memory, no random init), checks the file's key set and shapes against the model
**strictly**, then materialises every parameter from the memory-mapped file, casting each tensor to the
dtype the module wants (the files store everything in bf16/fp16; the official classes keep some
parameters in fp32). Only safetensors is ever read; a pickle/zip renamed ``.safetensors`` or a
truncated file raises :class:`CheckpointError` before anything is parsed by a loader.

Classes are registered lazily in :data:`MODEL_CLASSES` (``name -> "relative.module:Class"``) so that
importing this package does not import every model.

Modules that own *non-persistent* buffers (e.g. RoPE phase tables, regenerated from the config and
absent from the files) implement ``init_non_persistent_buffers(self, device) -> None``; the loader calls it on
every sub-module after the parameters are materialised (the buffers are still on ``meta`` then).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "MODEL_CLASSES",
    "CheckpointError",
    "register_model",
    "get_model_class",
    "resolve_checkpoint",
    "read_config",
    "build_model",
    "apply_dtype",
    "default_dtype_for",
    "read_safetensors_header",
    "check_state_dict_keys",
    "load_safetensors_into",
    "from_pretrained",
]

# Official class name -> "relative.module:Class" (relative to this package). Other helpers add theirs.
MODEL_CLASSES: dict[str, str] = {
    "SparseStructureFlowModel": ".sparse_structure_flow:SparseStructureFlowModel",
    "SLatFlowModel": ".structured_latent_flow:SLatFlowModel",
    "ElasticSLatFlowModel": ".structured_latent_flow:SLatFlowModel",
    # SC-VAEs and the dense sparse-structure decoder (sparse helper)
    "SparseUnetVaeEncoder": ".sc_vaes.sparse_unet_vae:SparseUnetVaeEncoder",
    "SparseUnetVaeDecoder": ".sc_vaes.sparse_unet_vae:SparseUnetVaeDecoder",
    "FlexiDualGridVaeEncoder": ".sc_vaes.fdg_vae:FlexiDualGridVaeEncoder",
    "FlexiDualGridVaeDecoder": ".sc_vaes.fdg_vae:FlexiDualGridVaeDecoder",
    "SparseStructureDecoder": ".sparse_structure_vae:SparseStructureDecoder",
    "SparseStructureEncoder": ".sparse_structure_vae:SparseStructureEncoder",
}

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded: bad file, unknown class, or key/shape mismatch.

    Attributes: ``path`` (the offending file), ``missing``, ``unexpected`` and ``mismatched``
    (``key -> (file shape, model shape)``) where a key check failed.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, *,
                 missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = dict(mismatched or {})


# --------------------------------------------------------------------------------------------------
# registry


def register_model(name: str, target: str | type) -> None:
    """Register class ``name``: ``target`` is a class or ``"relative.module:Class"`` (lazy)."""
    MODEL_CLASSES[name] = target  # type: ignore[assignment]


def get_model_class(name: str) -> type[nn.Module]:
    """Resolve an official class name to our implementation (imports its module on first use)."""
    target = MODEL_CLASSES.get(name)
    if target is None:
        raise CheckpointError(f"unknown model class {name!r}; known: {sorted(MODEL_CLASSES)}")
    if isinstance(target, type):
        return target
    mod_name, _, cls_name = target.partition(":")
    module = importlib.import_module(mod_name, __package__) if mod_name.startswith(".") \
        else importlib.import_module(mod_name)
    return getattr(module, cls_name)


# --------------------------------------------------------------------------------------------------
# paths and config


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(json_path, safetensors_path)`` of a checkpoint given as stem, either file, or a folder.

    A folder must hold exactly one ``X.json`` / ``X.safetensors`` pair.
    """
    p = Path(path)
    if p.is_dir():
        pairs = sorted(j for j in p.glob("*.json") if j.with_suffix(".safetensors").is_file())
        if len(pairs) != 1:
            raise CheckpointError(
                f"{p}: expected exactly one <name>.json/<name>.safetensors pair, found "
                f"{[j.stem for j in pairs]}", p)
        return pairs[0], pairs[0].with_suffix(".safetensors")
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    js, st = Path(f"{p}.json"), Path(f"{p}.safetensors")
    for f in (js, st):
        if not f.is_file():
            raise CheckpointError(f"checkpoint file not found: {f}", f)
    return js, st


def read_config(json_path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(class name, args)`` from a checkpoint JSON ``{"name": ..., "args": {...}}``."""
    try:
        cfg = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{json_path}: cannot read checkpoint config: {e}", json_path) from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str):
        raise CheckpointError(f"{json_path}: config must be {{'name': str, 'args': dict}}", json_path)
    args = cfg.get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"{json_path}: 'args' must be an object", json_path)
    return cfg["name"], dict(args)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def apply_dtype(cls: type, args: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Rewrite the precision arguments of ``args`` so that ``cls`` computes in ``dtype``.

    Covers the two official conventions: ``dtype="bfloat16"|"float32"|...`` (flows) and
    ``use_fp16: bool`` (VAEs). A class may override this with a classmethod ``args_for_dtype``.
    """
    hook = getattr(cls, "args_for_dtype", None)
    if hook is not None:
        return hook(dict(args), dtype)
    params = inspect.signature(cls.__init__).parameters
    out = dict(args)
    if "dtype" in params or "dtype" in out:
        out["dtype"] = _dtype_name(dtype)
    if "use_fp16" in params or "use_fp16" in out:
        out["use_fp16"] = dtype == torch.float16
    return out


def build_model(name: str, args: Mapping[str, Any], device: str | torch.device = "meta") -> nn.Module:
    """Instantiate class ``name`` with ``args`` on ``device`` (``meta``: no memory, no init cost)."""
    cls = get_model_class(name)
    try:
        with torch.device(device):
            return cls(**args)
    except TypeError as e:
        raise CheckpointError(f"cannot build {name} with args {dict(args)}: {e}") from e


# --------------------------------------------------------------------------------------------------
# safetensors reading


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Validate a safetensors file's framing and return ``key -> (shape, dtype string)``.

    Raises :class:`CheckpointError` for a pickle / zip (``torch.save``) file under a ``.safetensors``
    name, a malformed header, and a truncated file (data shorter than the header promises). Nothing
    in the file is ever unpickled or executed.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            # a safetensors file is <u64 header length><"{"...>; only a file that is not one is checked
            # against the pickle / zip / gzip signatures (a length whose low byte is 0x80 is legal)
            signature = head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[:2] == b"\x1f\x8b"
            if signature and head[8:9] != b"{":
                kind = "zip archive (torch.save)" if head[:2] == b"PK" else \
                    "gzip file" if head[:2] == b"\x1f\x8b" else "Python pickle"
                raise CheckpointError(
                    f"{path}: not a safetensors file — it looks like a {kind} renamed .safetensors; "
                    f"pickle-based checkpoints are never loaded (they can execute code)", path)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes; truncated?)",
                                      path)
            (n,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} vs file size {size}); "
                    f"the file is truncated or in another format", path)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}", path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file (bad JSON header: {e})", path) from e
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            shape = tuple(int(s) for s in info["shape"])
            dt = str(info["dtype"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for key {key!r}", path) from e
        if dt not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: key {key!r} has unsupported dtype {dt}", path)
        nbytes = _SAFETENSORS_DTYPES[dt].itemsize
        for s in shape:
            nbytes *= s
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: key {key!r}: byte range {begin}..{end} does not match "
                                  f"shape {list(shape)} {dt}", path)
        if end > data_len:
            raise CheckpointError(
                f"{path}: file is truncated: key {key!r} needs bytes up to {8 + n + end}, "
                f"file has {size}", path)
        out[key] = (shape, dt)
    return out


def check_state_dict_keys(path: str | os.PathLike, file_shapes: Mapping[str, tuple[int, ...]],
                          model_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict key + shape comparison; raises :class:`CheckpointError` naming the file and keys."""
    missing = sorted(set(model_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(model_shapes))
    mismatched = {k: (tuple(file_shapes[k]), tuple(model_shapes[k]))
                  for k in sorted(set(file_shapes) & set(model_shapes))
                  if tuple(file_shapes[k]) != tuple(model_shapes[k])}
    if not (missing or unexpected or mismatched):
        return

    def lst(keys: list[str]) -> str:
        return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {lst(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {lst(unexpected)}")
    if mismatched:
        mm = [f"{k} (file {list(a)} vs model {list(b)})" for k, (a, b) in mismatched.items()]
        parts.append(f"shape mismatch: {lst(mm)}")
    raise CheckpointError(f"{path}: checkpoint does not match the model; " + "; ".join(parts), path,
                          missing=missing, unexpected=unexpected, mismatched=mismatched)


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    for m in model.modules():
        hook = getattr(m, "init_non_persistent_buffers", None)
        if callable(hook):
            hook(device)


def load_safetensors_into(model: nn.Module, path: str | os.PathLike,
                          device: str | torch.device = "cpu",
                          key_map: Mapping[str, str] | None = None,
                          ignore_keys: Iterable[str] = (),
                          tick: Callable[[], None] | None = None) -> nn.Module:
    """Fill ``model`` (typically built on ``meta``) from safetensors file ``path``, strictly.

    Each stored tensor is read from the memory map, cast to the dtype of the module's own
    parameter/buffer and moved to ``device``, then *assigned* (no second full copy of the weights).
    ``key_map`` optionally renames file keys (``file key -> model key``) before the check;
    ``ignore_keys`` names file keys that are known to be unused (e.g. training-only heads) and are
    skipped when present — nothing else is tolerated.
    Non-persistent buffers are then regenerated through ``init_non_persistent_buffers``.
    ``tick()`` is called before each tensor and may raise (a cancel): loading stops there.
    """
    from safetensors import safe_open

    path = Path(path)
    header = read_safetensors_header(path)
    key_map = dict(key_map or {})
    ignored = set(ignore_keys)
    header = {k: v for k, v in header.items() if k not in ignored}
    file_shapes = {key_map.get(k, k): s for k, (s, _) in header.items()}
    targets = model.state_dict(keep_vars=True)
    check_state_dict_keys(path, file_shapes, {k: tuple(v.shape) for k, v in targets.items()})
    inverse = {key_map.get(k, k): k for k in header}
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    stop: BaseException | None = None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for mkey, target in targets.items():
                if tick is not None:
                    try:
                        tick()
                    except BaseException as e:  # noqa: BLE001 - a cancel, not a checkpoint problem
                        stop = e
                        break
                t = f.get_tensor(inverse[mkey])
                state[mkey] = t.to(device=device, dtype=target.dtype)
                del t
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt data
        raise CheckpointError(f"{path}: cannot read tensors: {e}", path) from e
    if stop is not None:
        state.clear()
        raise stop
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # non-persistent buffers are not in the file: regenerate them from the config
    _init_buffers(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: model tensors left uninitialised after loading: {left[:10]}",
                              path)
    return model


def default_dtype_for(device: str | torch.device) -> torch.dtype | None:
    """Compute dtype policy: fp32 on CPU; ``None`` (= the checkpoint's official dtypes) elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else None


def from_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, tick: Callable[[], None] | None = None) -> nn.Module:
    """Load an official-format checkpoint ``<stem>.json`` + ``<stem>.safetensors``.

    ``path`` is the stem, either file, or a folder holding one pair. ``dtype``: ``None`` means fp32 on
    CPU and the config's own (official) precision on other devices; an explicit dtype rewrites the
    config's precision arguments (see :func:`apply_dtype`). The model is returned in ``eval()`` mode.
    """
    js, st = resolve_checkpoint(path)
    name, args = read_config(js)
    cls = get_model_class(name)
    if dtype is None:
        dtype = default_dtype_for(device)
    if dtype is not None:
        args = apply_dtype(cls, args, dtype)
    model = build_model(name, args, "meta")
    load_safetensors_into(model, st, device=device, tick=tick)
    return model.eval()
