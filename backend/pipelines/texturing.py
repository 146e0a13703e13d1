"""Texture-only pipeline (spec §3): mesh + image → PBR textures baked into the mesh's own UVs.

mesh (+ transform) → unit cube (official ``0.99999 / max_extent`` about the bbox centre) → O-Voxel
shape (codec ``encode_shape``) → shape encoder (mean) → material flow (concat = normalised shape
latent) → texture decoder on the encoder's own hierarchy (so its voxels are exactly the encoded ones)
→ per-texel UV rasterisation → barycentric 3D position → codec ``sample_attributes`` (sparse trilinear,
official renormalisation) → nearest-texel dilation of empty texels → glTF PBR images.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import TextureResult
from ..errors import BadInput
from ..killable import ChildError, call_in_child
from ..modules.sparse import SparseTensor
from .bake import bake_pbr, corner_uvs, unwrap_uvs, validate_mesh
from .preprocess import preprocess_image

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import Trellis2Pipelines, _Run

__all__ = ["run_texturing", "normalize_to_unit_cube", "encode_mesh_shape"]
log = logging.getLogger(__name__)

TEXTURE_SIZES = (256, 512, 1024, 2048, 4096)
#: grids from this resolution up are encoded on the CPU in a killable child when a cancel check is given
ENCODE_CHILD_RESOLUTION = 512


def normalize_to_unit_cube(v: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Official normalisation: centre on the bbox centre (of used vertices), scale ``0.99999 / max_extent``."""
    used = v[np.unique(faces)]
    lo, hi = used.min(0), used.max(0)
    center = (lo + hi) / 2
    scale = 0.99999 / float((hi - lo).max())
    return (v - center) * scale, center, scale


def _apply_transform(v: np.ndarray, transform: np.ndarray | None, y_up: bool) -> np.ndarray:
    if transform is not None:
        m = np.asarray(transform, np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise BadInput(f"transform must be a finite 4×4 matrix, got shape {m.shape}.")
        v = v @ m[:3, :3].T + m[:3, 3]
    if y_up:  # glTF/OBJ Y-up → TRELLIS/Blender Z-up: (x, y, z) → (x, −z, y)
        v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], axis=1)
    return v


def encode_mesh_shape(vertices: np.ndarray, faces: np.ndarray, resolution: int, device: torch.device | str,
                      tick: Callable[[], None] | None = None):
    """Unit-cube mesh → shape O-Voxel (official weights; geometry outside the cube is clipped).

    ``kernels.ovoxel_encode.select_encoder`` decides (CUDA → the torch port on that device, else the
    numpy codec; ``TRELLIS_KERNELS`` overrides). Bad geometry raises ``OVoxelError`` either way; any
    other failure of the port (e.g. GPU memory) is logged and the codec does the encode instead.
    """
    from kernels import ovoxel_encode

    from .. import ovoxel

    dev = torch.device(device)
    if ovoxel_encode.select_encoder(dev) == "torch":
        try:
            return ovoxel_encode.encode_shape_torch(vertices, faces, resolution, outside="clip", device=dev)
        except ovoxel.OVoxelError:
            raise
        except Exception as e:  # noqa: BLE001 - the CPU codec is always a correct answer
            log.warning("O-Voxel encode on %s failed (%s: %s); encoding on the CPU instead", dev,
                        type(e).__name__, e)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    if tick is None or resolution < ENCODE_CHILD_RESOLUTION:
        return ovoxel.encode_shape(vertices, faces, resolution, outside="clip")
    # the codec's encode is seconds of numpy at R=1024: in a child that a cancel (tick) kills
    try:
        out = call_in_child("ovoxel", "encode_shape", [vertices, faces], {"resolution": int(resolution),
                            "outside": "clip"}, ("coords", "dual_vertices", "intersected"), tick)
    except ChildError as e:
        if e.type_name == "OVoxelError":
            raise ovoxel.OVoxelError(e.message) from None
        raise RuntimeError(f"O-Voxel encode failed: {e}") from None
    return SimpleNamespace(**out)


@torch.no_grad()
def run_texturing(pipe: "Trellis2Pipelines", vertices: np.ndarray, faces: np.ndarray, image: Any, *,
                  uvs: np.ndarray | None, transform: np.ndarray | None, y_up: bool, seed: int, resolution: int,
                  texture_size: int, stage_params: dict, run: "_Run", preprocess: bool = True,
                  background: str = "auto") -> TextureResult:
    """See :meth:`Trellis2Pipelines.texture`."""
    from .. import ovoxel

    if not isinstance(resolution, int) or resolution % 64 or not 64 <= resolution <= 2048:
        raise BadInput(f"texturing resolution must be 512, 1024 or 1536 (any multiple of 64 up to 2048), "
                       f"got {resolution}.")
    if int(texture_size) < 16 or int(texture_size) > 8192:
        raise BadInput(f"texture size must be in [16, 8192], got {texture_size}.")
    v_in, f_in = validate_mesh(vertices, faces)
    with run.stage_ctx("preprocess"):
        if uvs is not None:
            uv = corner_uvs(uvs, f_in)
            out_v, out_f, uv_created = np.asarray(vertices, np.float32), np.asarray(faces), False
            geo_v, geo_f = v_in, f_in
        else:
            vmap, out_f, vert_uv = unwrap_uvs(v_in, f_in, tick=run.check)
            out_v = np.asarray(vertices, np.float32)[vmap]
            geo_v, geo_f = v_in[vmap], out_f
            uv = vert_uv[out_f]
            uv_created = True
        world = _apply_transform(geo_v, transform, y_up)
        unit, center, scale = normalize_to_unit_cube(world, geo_f)
        # through this module's name: the pipeline-parity harness observes preprocess_image here
        img = preprocess_image(image, pipe.remover(), background) if preprocess else \
            pipe.cut_out(image, preprocess=False)[0]
    gen = pipe._rng(seed)
    res = pipe._res(resolution)
    with run.stage_ctx("cond"):
        cond = pipe.get_cond(img, 512 if resolution <= 512 else 1024)
    with run.stage_ctx("encode"):
        try:
            enc = encode_mesh_shape(unit.astype(np.float32), geo_f, res, pipe.device, tick=run.check)
        except ovoxel.OVoxelError as e:
            raise BadInput(f"the mesh cannot be voxelised: {e}") from e
        coords_np, dual_np, inter_np = enc.coords, enc.dual_vertices, enc.intersected
        if len(coords_np) == 0:
            raise BadInput("the mesh produced no voxels (is it flat or tiny?).")
        c = torch.from_numpy(np.asarray(coords_np, np.int32))
        c = torch.cat([torch.zeros(c.shape[0], 1, dtype=torch.int32), c], 1).to(pipe.device)
        vt = SparseTensor(torch.from_numpy(np.asarray(dual_np, np.float32)).to(pipe.device), c)
        it = vt.replace(torch.from_numpy(np.asarray(inter_np, bool)).to(pipe.device))
        with pipe.models.use("shape_slat_encoder") as encoder:
            dt = pipe._layer_dtype(encoder, "input_layer")
            shape, hierarchy = encoder(vt.to(dt), it, return_hierarchy=True)
        shape = shape.float()
    tex = pipe.sample_tex_slat(run, "tex_slat_flow_model_512" if resolution <= 512 else "tex_slat_flow_model_1024",
                               cond, shape, gen, stage_params.get("tex_slat"), texturing=True)
    with run.stage_ctx("decode"):
        with pipe.models.use("tex_slat_decoder") as tdec:
            tv = tdec(tex.to(pipe._dec_dtype(tdec)), hierarchy=hierarchy)
        if not torch.equal(tv.coords, c):
            raise RuntimeError("texture decoder voxels differ from the encoded voxels")
        attrs = (tv.feats.float() * 0.5 + 0.5).cpu().numpy()
        del tv, tex, shape, hierarchy
    with run.stage_ctx("bake"):
        base, mr, coverage = bake_pbr(unit, geo_f, uv, coords_np, attrs, res, int(texture_size), pipe.device,
                                      progress=run.step_callback, check=run.check)  # chunked: cancel per chunk
    return TextureResult(base_color=base, metallic_roughness=mr, vertices=out_v, faces=np.asarray(out_f, np.int32),
                         uvs=uv.astype(np.float32), uv_created=uv_created, resolution=res,
                         coords=np.asarray(coords_np, np.int32), attrs=attrs,
                         normalization=(center.astype(np.float32), float(scale)), coverage=coverage,
                         timings=dict(run.timings))
