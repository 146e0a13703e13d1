"""The official ``.vxz`` container (o_voxel/io/vxz.py), in numpy + stdlib.

Layout: ``b"VXZ" + version 0 + big-endian uint32 offset of the binary section``, a UTF-8 JSON header,
then the binary section. The volume is cut into chunks of ``chunk_size``^3 (power of two); every chunk
stores its voxels as a sparse voxel octree (one child-mask byte per node, depth-first pre-order,
child index = x<<2 | y<<1 | z, the last level's masks mark the voxels) followed by one compressed
stream per attribute (``attr_interleave="as_is"``) in the chunk's Morton order.
Attributes are uint8: shape ``vertices`` (3, ``floor(u*255)``) and ``intersected`` (1, bits), PBR
``base_color`` (3), ``metallic``, ``roughness``, ``alpha`` (``round(x*255)``). Compression: ``lzma``
(raw LZMA2, official default), ``deflate`` (raw, wbits -15), ``none``, ``zstd`` (only if the
``zstandard`` module is importable). Only ``filter="none"`` is written; ``parent``/``neighbor``
filtered files are refused on read.

Our writer adds top-level header keys ``resolution``, ``aabb`` and ``trellis2_format_version``
(ignored by the official reader). Files without them need ``resolution`` passed to the reader.
"""

from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from typing import Any

import numpy as np

from ._types import ATTR_LAYOUT, FORMAT_VERSION, OVoxel, OVoxelError, as_aabb, check_resolution, pack_flags, \
    quantize_dual_vertices, unpack_flags
from .grid import morton_decode, morton_encode

_LEVEL = {"none": 0, "deflate": 9, "lzma": 9, "zstd": 22}
_PBR_ATTRS = (("base_color", 3), ("metallic", 1), ("roughness", 1), ("alpha", 1))


def _compress(data: bytes, algo: str, level: int) -> bytes:
    if algo == "none":
        return data
    if algo == "deflate":
        c = zlib.compressobj(level, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    if algo == "lzma":
        c = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": level}])
        return c.compress(data) + c.flush()
    if algo == "zstd":
        try:
            import zstandard
        except ImportError:
            raise OVoxelError("zstd compression needs the 'zstandard' module") from None
        return zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True).compress(data)
    raise OVoxelError(f"unknown vxz compression {algo!r}")


def _decompress(data: bytes, algo: str, level: int) -> bytes:
    try:
        if algo == "none":
            return data
        if algo == "deflate":
            d = zlib.decompressobj(-15)
            return d.decompress(data) + d.flush()
        if algo == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": level}])
            return d.decompress(data)
        if algo == "zstd":
            try:
                import zstandard
            except ImportError:
                raise OVoxelError("this .vxz uses zstd; install 'zstandard' to read it") from None
            return zstandard.ZstdDecompressor().decompress(data)
    except (lzma.LZMAError, zlib.error) as e:
        raise OVoxelError(f"corrupt vxz stream ({e})") from None
    raise OVoxelError(f"unknown vxz compression {algo!r}")


def encode_svo(codes: np.ndarray, depth: int) -> np.ndarray:
    """Sorted unique Morton codes (< 8**depth) -> SVO bytes (official pre-order child masks)."""
    codes = np.asarray(codes, np.int64)
    keys, levels, masks = [], [], []
    for lv in range(depth):
        shift_p = 3 * (depth - lv)
        prefix = codes >> shift_p
        child = (codes >> (3 * (depth - 1 - lv))) & 7
        first = np.empty(codes.shape[0], bool)
        first[0] = True
        np.not_equal(prefix[1:], prefix[:-1], out=first[1:])
        st = np.flatnonzero(first)
        masks.append(np.bitwise_or.reduceat((1 << child).astype(np.int64), st))
        keys.append(prefix[st] << shift_p)
        levels.append(np.full(st.shape[0], lv, np.int64))
    key = np.concatenate(keys)
    lev = np.concatenate(levels)
    order = np.lexsort((lev, key))
    return np.concatenate(masks)[order].astype(np.uint8)


def decode_svo(svo: np.ndarray, depth: int) -> np.ndarray:
    """SVO bytes -> sorted Morton codes (inverse of :func:`encode_svo`)."""
    data = bytes(np.asarray(svo, np.uint8))
    n = len(data)
    leaf_prefix = []
    leaf_mask = []
    bits = [[i for i in range(8) if m >> i & 1] for m in range(256)]
    if n == 0:
        return np.zeros(0, np.int64)
    # explicit stack of (level, prefix, remaining child bits)
    ptr = 1
    stack = [(0, 0, bits[data[0]], 0)] if depth > 1 else None
    if depth == 1:
        return np.asarray(bits[data[0]], np.int64)
    while stack:
        lv, prefix, kids, k = stack.pop()
        if k >= len(kids):
            continue
        stack.append((lv, prefix, kids, k + 1))
        if ptr >= n:
            raise OVoxelError("corrupt vxz octree (truncated)")
        m = data[ptr]
        ptr += 1
        child_prefix = (prefix << 3) | kids[k]
        if lv + 1 == depth - 1:
            leaf_prefix.append(child_prefix)
            leaf_mask.append(m)
        else:
            stack.append((lv + 1, child_prefix, bits[m], 0))
    if not leaf_prefix:
        return np.zeros(0, np.int64)
    lp = np.asarray(leaf_prefix, np.int64)
    lm = np.asarray(leaf_mask, np.int64)
    bitmat = (lm[:, None] >> np.arange(8)) & 1
    r, c = np.nonzero(bitmat)
    return (lp[r] << 3) | c


def write_vxz(path: "str | os.PathLike", ov: OVoxel, *, compression: str = "lzma", chunk_size: int = 256,
              compression_level: "int | None" = None) -> None:
    """Write ``ov`` (dual vertices / attributes quantised to uint8) as an official ``.vxz``."""
    ov.validate()
    if chunk_size < 2 or chunk_size & (chunk_size - 1) or chunk_size > 1024:
        raise OVoxelError(f"chunk_size must be a power of two in [2, 1024], got {chunk_size}")
    if compression not in _LEVEL:
        raise OVoxelError(f"unknown vxz compression {compression!r}")
    level = _LEVEL[compression] if compression_level is None else int(compression_level)
    depth = int(np.log2(chunk_size))
    attrs = [("vertices", quantize_dual_vertices(ov.dual_vertices)), ("intersected", pack_flags(ov.intersected))]
    if ov.attrs is not None and ov.attrs.shape[1] == 6:
        q = np.clip(np.rint(ov.attrs * 255.0), 0, 255).astype(np.uint8)
        for name, _ in _PBR_ATTRS:
            attrs.append((name, np.ascontiguousarray(q[:, ATTR_LAYOUT[name]])))
    coords = ov.coords.astype(np.int64)
    cidx = coords // chunk_size
    local = coords % chunk_size
    nc = (ov.resolution + chunk_size - 1) // chunk_size
    ckey = (cidx[:, 0] * nc + cidx[:, 1]) * nc + cidx[:, 2]
    code = morton_encode(local)
    order = np.lexsort((code, ckey))
    ckey, code = ckey[order], code[order]
    info: dict[str, Any] = {
        "num_voxel": int(coords.shape[0]), "chunk_size": chunk_size, "filter": "none",
        "compression": compression, "compression_level": level,
        "raw_size": int(coords.shape[0] * 12 + sum(a.size for _, a in attrs)),
        "compressed_size": 0, "compress_ratio": 0.0, "attr_interleave": "as_is",
        "attr": [[k, int(a.shape[1])] for k, a in attrs], "chunks": [],
        "resolution": ov.resolution, "aabb": ov.aabb.tolist(), "trellis2_format_version": FORMAT_VERSION,
    }
    blobs = []
    off = 0
    if coords.shape[0]:
        first = np.empty(ckey.shape[0], bool)
        first[0] = True
        np.not_equal(ckey[1:], ckey[:-1], out=first[1:])
        starts = np.append(np.flatnonzero(first), ckey.shape[0])
        for a, b in zip(starts[:-1], starts[1:]):
            k = int(ckey[a])
            rows = order[a:b]
            chunk = {"idx": [k // (nc * nc), (k // nc) % nc, k % nc]}
            parts = []
            svo = _compress(encode_svo(code[a:b], depth).tobytes(), compression, level)
            chunk["svo"] = [0, len(svo)]
            parts.append(svo)
            pos = len(svo)
            for name, arr in attrs:
                data = _compress(np.ascontiguousarray(arr[rows]).tobytes(), compression, level)
                chunk[name] = [pos, len(data)]
                parts.append(data)
                pos += len(data)
            blob = b"".join(parts)
            chunk["ptr"] = [off, len(blob)]
            off += len(blob)
            blobs.append(blob)
            info["chunks"].append(chunk)
    binary = b"".join(blobs)
    info["compressed_size"] = len(binary)
    info["compress_ratio"] = info["raw_size"] / max(len(binary), 1)
    js = json.dumps(info).encode()
    with open(os.fspath(path), "wb") as fh:
        fh.write(b"VXZ\x00" + struct.pack(">I", len(js) + 8))
        fh.write(js)
        fh.write(binary)


def read_vxz(path: "str | os.PathLike", resolution: "int | None" = None, aabb: Any = None) -> OVoxel:
    """Read a ``.vxz`` (ours or official) into an :class:`OVoxel` (rows in chunk-major Morton order)."""
    p = os.fspath(path)
    with open(p, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or data[:3] != b"VXZ":
        raise OVoxelError(f"{p}: not a .vxz file")
    if data[3] != 0:
        raise OVoxelError(f"{p}: unsupported vxz version {data[3]}")
    start = struct.unpack(">I", data[4:8])[0]
    try:
        info = json.loads(data[8:start].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OVoxelError(f"{p}: corrupt vxz header ({e})") from None
    if info.get("filter", "none") != "none":
        raise OVoxelError(f"{p}: vxz filter {info['filter']!r} is not supported (only 'none')")
    if info.get("attr_interleave", "as_is") not in ("as_is", "none", "all"):
        raise OVoxelError(f"{p}: unknown attr_interleave {info.get('attr_interleave')!r}")
    R = resolution if resolution is not None else info.get("resolution")
    if R is None:
        raise OVoxelError(f"{p}: the file does not store its resolution; pass resolution=")
    R = check_resolution(R)
    box = as_aabb(aabb if aabb is not None else info.get("aabb"))
    cs = int(info["chunk_size"])
    depth = int(np.log2(cs))
    algo = info.get("compression", "lzma")
    level = info.get("compression_level") or _LEVEL.get(algo, 0)
    binary = data[start:]
    attr_spec = [(k, int(c)) for k, c in info["attr"]]
    total_ch = sum(c for _, c in attr_spec)
    coords_all, attrs_all = [], []
    for ch in info["chunks"]:
        blob = binary[ch["ptr"][0]: ch["ptr"][0] + ch["ptr"][1]]

        def stream(key):
            o, n = ch[key]
            return np.frombuffer(_decompress(blob[o:o + n], algo, level), np.uint8)

        codes = decode_svo(stream("svo"), depth)
        m = codes.shape[0]
        if info.get("attr_interleave", "as_is") == "as_is":
            cols = [stream(k).reshape(m, c) for k, c in attr_spec]
            a = np.concatenate(cols, axis=1) if cols else np.zeros((m, 0), np.uint8)
        elif info["attr_interleave"] == "none":
            a = np.stack([stream(f"{k}_{i}") for k, c in attr_spec for i in range(c)], 1)
        else:
            a = stream("attr").reshape(m, total_ch)
        coords_all.append(morton_decode(codes).astype(np.int64) + np.asarray(ch["idx"], np.int64) * cs)
        attrs_all.append(a)
    coords = np.concatenate(coords_all) if coords_all else np.zeros((0, 3), np.int64)
    A = np.concatenate(attrs_all) if attrs_all else np.zeros((0, total_ch), np.uint8)
    cols = {}
    c0 = 0
    for k, c in attr_spec:
        cols[k] = A[:, c0:c0 + c]
        c0 += c
    if "vertices" not in cols or "intersected" not in cols:
        raise OVoxelError(f"{p}: vxz without 'vertices'/'intersected' attributes (not a shape O-Voxel)")
    n = coords.shape[0]
    attrs = None
    if all(k in cols for k, _ in _PBR_ATTRS):
        attrs = np.concatenate([cols[k] for k, _ in _PBR_ATTRS], 1).astype(np.float32) / 255.0
    ov = OVoxel(resolution=R, aabb=box, coords=coords, dual_vertices=cols["vertices"].astype(np.float32) / 255.0,
                intersected=unpack_flags(cols["intersected"].reshape(n, -1)[:, :1]), attrs=attrs,
                meta={"vxz": {k: info.get(k) for k in ("chunk_size", "compression", "compressed_size")}})
    return ov.validate()
