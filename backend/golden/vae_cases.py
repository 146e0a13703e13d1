"""Golden handlers for the SC-VAEs and the sparse-structure decoder.

Cases: ``shape_encoder``, ``tex_encoder``, ``shape_decoder``, ``tex_decoder_guided``,
``tex_decoder_encoder_cache``, ``ss_decoder``. Models are loaded with the project's strict checkpoint
loader from the case's ``model_<stem>`` pair (``model_override`` replaces class/args, same weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import GoldenCase, case
from ..models import build_model, from_pretrained, load_safetensors_into
from ..modules.sparse import SparseHierarchy, SparseTensor


def _load(gc: GoldenCase) -> torch.nn.Module:
    stem = gc.model_path()
    override = gc.meta.get("model_override")
    if override:
        model = build_model(override["name"], override["args"], "meta")
        load_safetensors_into(model, stem.with_suffix(".safetensors"), device="cpu")
        return model.eval()
    return from_pretrained(stem, device="cpu")


def _check_equal(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    if tuple(got.shape) != tuple(ref.shape) or not torch.equal(got.to(ref.dtype), ref):
        raise AssertionError(f"{name} differs from the golden value")


def _encoder_outputs(gc: GoldenCase, z: SparseTensor, mean: torch.Tensor, logvar: torch.Tensor,
                     hier: SparseHierarchy) -> dict[str, torch.Tensor]:
    for k, m in enumerate(hier.maps, start=1):
        key = f"dbg.level{k}_coords"
        if key in gc.tensors:
            _check_equal(key, m.coarse_coords, gc.tensors[key])
    if not torch.equal(z.feats, mean):
        raise AssertionError("z must equal mean without posterior sampling")
    return {"out.latent_coords": z.coords, "out.mean": mean, "out.logvar": logvar}


@case("shape_encoder",
      call=('z, mean, logvar = model(SparseTensor(vertices, coords), SparseTensor(intersected, coords), '
            'return_raw=True)'))
def shape_encoder(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """FlexiDualGridVaeEncoder on a flexible dual grid; level coords checked exactly on the way."""
    t = gc.tensors
    model = _load(gc)
    z, mean, logvar, hier = model(SparseTensor(t["in.vertices"], t["in.coords"]),
                                  SparseTensor(t["in.intersected"], t["in.coords"]),
                                  return_raw=True, return_hierarchy=True)
    return _encoder_outputs(gc, z, mean, logvar, hier)


@case("tex_encoder",
      call='z, mean, logvar = model(SparseTensor(feats, coords), return_raw=True)')
def tex_encoder(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """SparseUnetVaeEncoder (class/args from ``model_override``) on 6-channel features."""
    t = gc.tensors
    model = _load(gc)
    z, mean, logvar, hier = model(SparseTensor(t["in.feats"], t["in.coords"]), return_raw=True,
                                  return_hierarchy=True)
    return _encoder_outputs(gc, z, mean, logvar, hier)


def shape_decoder(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """FlexiDualGridVaeDecoder: raw output, subdivision logits, FDG head and the extracted meshes."""
    from ..models.sc_vaes.fdg_vae import fdg_head

    t = gc.tensors
    model = _load(gc)
    x = SparseTensor(t["in.latent"], t["in.coords"])
    h, subs = model.decode_raw(x, return_subs=True)
    out: dict[str, torch.Tensor] = {"out.h": h.feats, "out.coords": h.coords}
    for i, s in enumerate(subs):
        out[f"out.sub{i}_logits"] = s.feats
        out[f"out.sub{i}_coords"] = s.coords
    fields = fdg_head(h, model.voxel_margin)
    out["out.dual_vertices"] = fields.dual_vertices.feats
    out["out.intersected"] = fields.intersected.feats
    out["out.split_weight"] = fields.split_weight.feats
    for b, (verts, faces) in enumerate(model.extract_meshes(fields)):
        out[f"out.mesh{b}_vertices"] = verts
        out[f"out.mesh{b}_faces"] = faces
    _check_equal("upsample(x, 4)", model.upsample(x, 4), t["out.coords"])
    return out


case("shape_decoder", call="meshes, subs = model(SparseTensor(latent, coords), return_subs=True)")(shape_decoder)


@case("tex_decoder_guided",
      call=('y = model(SparseTensor(latent, coords), guide_subs=[SparseTensor(guide_sub{i}_logits, '
            'guide_sub{i}_coords) for i in 0..3])'))
def tex_decoder_guided(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Texture decoder following the shape decoder's subdivision logits (row for row)."""
    t = gc.tensors
    model = _load(gc)
    guides = [SparseTensor(t[f"in.guide_sub{i}_logits"], t[f"in.guide_sub{i}_coords"])
              for i in range(model.num_levels)]
    y = model(SparseTensor(t["in.latent"], t["in.coords"]), guide_subs=guides)
    return {"out.y": y.feats, "out.coords": y.coords}


@case("tex_decoder_encoder_cache",
      call='z = shape_encoder(...)  [case shape_encoder];  y = model(z.replace(latent))')
def tex_decoder_encoder_cache(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Texture decoder on the encoder's level hierarchy, passed explicitly (texturing pipeline)."""
    t = gc.tensors
    model = _load(gc)
    hier = SparseHierarchy.from_coords(t["in.fine_coords"], model.num_levels)
    _check_equal("hierarchy latent coords", hier.latent_coords, t["in.latent_coords"])
    y = model(SparseTensor(t["in.latent"], t["in.latent_coords"]), hierarchy=hier)
    return {"out.y": y.feats, "out.coords": y.coords}


@case("ss_decoder",
      call=("logits = model(z); occ_coords = argwhere(logits > 0)[:, [0,2,3,4]]; "
            "occ_coords_pool2 = argwhere(max_pool3d((logits>0).float(), 2, 2, 0) > 0.5)[:, [0,2,3,4]]"))
def ss_decoder(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Dense SS decoder + the pipeline's occupancy extraction (and its 2× max-pool variant)."""
    model = _load(gc)
    logits = model(gc.tensors["in.z"])
    occ = logits > 0
    pooled = F.max_pool3d(occ.float(), 2, 2, 0) > 0.5
    return {
        "out.logits": logits,
        "out.occ_coords": torch.argwhere(occ)[:, [0, 2, 3, 4]].int(),
        "out.occ_coords_pool2": torch.argwhere(pooled)[:, [0, 2, 3, 4]].int(),
    }


@case("ss_encoder", call="z, mean, logvar = model(x, sample_posterior=False, return_raw=True)")
def ss_encoder(gc: GoldenCase) -> dict[str, torch.Tensor]:
    """Dense SS encoder (TRELLIS v1 ``ss_enc_conv3d_16l8_fp16``, blockout guidance) on an occupancy volume
    ``in.x`` ``[B, 1, R, R, R]``: the posterior mean (what guidance uses), the log-variance and ``z``
    (= mean without sampling). No such case ships yet; the handler is ready for one built from the
    official JSON (model pair ``model_<stem>``, loaded strictly)."""
    model = _load(gc)
    z, mean, logvar = model(gc.tensors["in.x"], sample_posterior=False, return_raw=True)
    if not torch.equal(z, mean):
        raise AssertionError("z must equal mean without posterior sampling")
    return {"out.z": z, "out.mean": mean, "out.logvar": logvar}
