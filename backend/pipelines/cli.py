"""``trellis2 generate | texture | upscale | make-tiny`` (registration is torch-free).

Examples::

    trellis2 generate photo.png -o out.glb --model ~/models/TRELLIS.2-4B --pipeline 1024_cascade --seed 7
    trellis2 texture mesh.glb photo.png -o textured.glb --model ~/models/TRELLIS.2-4B
    trellis2 upscale JOB_DIR -o out_1536.glb --model ~/models/TRELLIS.2-4B
    trellis2 make-tiny /tmp/tiny            # random tiny checkpoints in the official layout (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..contract import BACKGROUND_MODES, DEFAULT_SEED, MULTIVIEW_MODES, PIPELINE_TYPES

__all__ = ["register"]

_STAGES = ("sparse_structure", "shape_slat", "tex_slat")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-dir", dest="model_dir", required=True,
                   help="pipeline folder (pipeline.json, texturing_pipeline.json, ckpts/)")
    p.add_argument("--dinov3-dir", help="DINOv3 ViT-L/16 folder (config.json + model.safetensors)")
    p.add_argument("--ss-decoder-dir", help="folder with ss_dec_conv3d_16l8_fp16.json/.safetensors (TRELLIS v1)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N | mps (default auto: CUDA, else Apple MPS, else CPU)")
    p.add_argument("--low-vram", action="store_true", help="keep only the running stage's model on the GPU")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="flow transformers' dtype (auto: bf16 on RTX 30xx/A100+, fp16 on older GPUs, fp32 on CPU)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cascade token budget (official 49152; lower uses less VRAM, steps the 1536 grid down)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--background", default="auto", choices=BACKGROUND_MODES,
                   help="cut-out policy: auto = the image's alpha if it has one, else the background-removal "
                        "model (--rembg-model), else the plain-background keyer; remove = ignore alpha and "
                        "cut out; keep = no cut-out (default auto)")
    p.add_argument("--rembg-model", dest="rembg_dir", default=None,
                   help="BiRefNet / RMBG-2.0 folder (model.safetensors), e.g. a download of ZhengPeng7/BiRefNet")
    p.add_argument("--texture-size", type=int, default=2048)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the Python traceback of an error (also: trellis2 --debug COMMAND)")
    for st in _STAGES:
        flag = st.replace("_", "-")
        p.add_argument(f"--{flag}-steps", type=int, help=f"{st} sampler steps")
        p.add_argument(f"--{flag}-guidance", type=float, help=f"{st} guidance strength")
        p.add_argument(f"--{flag}-rescale", type=float, help=f"{st} guidance rescale")


def _stage_params(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for st in _STAGES:
        d = {"steps": getattr(args, f"{st}_steps"), "guidance_strength": getattr(args, f"{st}_guidance"),
             "guidance_rescale": getattr(args, f"{st}_rescale")}
        d = {k: v for k, v in d.items() if v is not None}
        if d:
            out[st] = d
    return out


def _progress(quiet: bool):
    if quiet:
        return None

    def report(stage: str, step: int, total: int, elapsed: float) -> None:
        print(f"\r[{elapsed:7.1f}s] {stage:18s} {step}/{total}", end="\n" if step == total else "",
              file=sys.stderr, flush=True)

    return report


def _request(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The CLI arguments as a job request, checked by the shared validation layer (field types and
    ranges, output path) before any model or input is touched; returns the normalised request."""
    from ..errors import BadInput
    from ..validation import check_output_path, validate_request

    req: dict[str, Any] = {"type": kind, "seed": args.seed, "texture_size": args.texture_size,
                           "max_tokens": args.max_tokens, "precision": args.precision, "device": args.device,
                           "stage_params": _stage_params(args)}
    if kind == "texture":
        req["resolution"] = args.resolution
    else:
        req["decimation_target"] = args.decimate
    if kind == "generate":
        req.update(images=list(args.image), multiview=args.multiview,
                   guide_strength=args.guide_strength if args.guide_mesh else None)
    try:
        out = validate_request(req, kind, partial=True)
    except BadInput as e:
        e.message = f"{_flag(e.field or '')}: {e.message}"
        raise
    check_output_path(args.output)
    return out


def _flag(field: str) -> str:
    """The command-line option of a request field (``stage_params.shape_slat.steps`` → ``--shape-slat-steps``)."""
    names = {"texture_size": "--texture-size", "max_tokens": "--max-tokens", "decimation_target": "--decimate"}
    parts = field.split(".")
    if parts[0] == "stage_params" and len(parts) == 3:
        short = {"guidance_strength": "guidance", "guidance_rescale": "rescale"}.get(parts[2], parts[2])
        return f"--{parts[1].replace('_', '-')}-{short}"
    return names.get(field, f"--{field.replace('_', '-')}")


def _open(args: argparse.Namespace, texturing_only: bool = False):
    from . import load_pipeline
    from .pipeline import token_budget

    budget = token_budget(args.max_tokens)  # checked before any model is touched
    pipe = load_pipeline(args.model_dir, dinov3_dir=args.dinov3_dir, ss_decoder_dir=args.ss_decoder_dir,
                         device=args.device, low_vram=args.low_vram, texturing_only=texturing_only,
                         precision=args.precision, rembg_dir=args.rembg_dir)
    pipe.max_num_tokens = budget
    return pipe


def _run(fn) -> int:
    """Run a command body; typed errors, Ctrl-C and tracebacks (``--debug``) are handled once, by
    :func:`backend.cli.run_command`."""
    return fn()


def _check_image(path: str) -> None:
    """Open and fully validate the input image before any model loads (format, size, bomb guard)."""
    from .preprocess import load_image

    load_image(path)


def _export_generation(res, args: argparse.Namespace, device=None, to_world=None) -> None:
    from .export import generation_to_textured_mesh, write_glb

    t0 = time.perf_counter()
    report = _progress(args.quiet)
    v, f, uv, base, mr = generation_to_textured_mesh(
        res, texture_size=args.texture_size, decimate=getattr(args, "decimate", None), device=device,
        progress=None if report is None else lambda st, i, n: report(st, i, n, time.perf_counter() - t0))
    if to_world is not None:   # a blockout-guided result goes back onto its blockout
        v = to_world(v).astype(v.dtype)
    write_glb(args.output, v, f, uv, base, mr)
    if getattr(args, "save_job", None):
        res.state.save(args.save_job)
    print(f"wrote {args.output}: {len(v)} vertices, {len(f)} faces, resolution {res.resolution}, "
          f"{res.num_voxels} voxels", file=sys.stderr)


def _print_cutout(info: dict[str, Any]) -> None:
    how = {"alpha": "the image's alpha channel", "model": "the background-removal model",
           "keyer": "the plain-background keyer", "none": "none (image used as is)"}
    print(f"cut-out: {how.get(info.get('background'), info.get('background'))}", file=sys.stderr)
    if info.get("note"):
        print(f"note: {info['note']}", file=sys.stderr)


def _cmd_generate(args: argparse.Namespace) -> int:
    def go() -> int:
        _request(args, "generate")
        for path in args.image:
            _check_image(path)
        guide = None
        if args.guide_mesh:
            from .guide import prepare_guide

            v, f, _, y_up = _read_mesh(args.guide_mesh, args.guide_z_up, field="guide_mesh")
            guide = prepare_guide(v, f, args.guide_strength, y_up=y_up)
        pipe = _open(args)
        t = time.perf_counter()
        images = args.image if len(args.image) > 1 else args.image[0]
        res = pipe.generate(images, args.pipeline, seed=args.seed, stage_params=_stage_params(args),
                            progress=_progress(args.quiet), background=args.background, multiview=args.multiview,
                            guide=guide)
        _print_cutout(res.preprocess_info)
        _export_generation(res, args, pipe.device, to_world=None if guide is None else guide.to_world)
        print(f"done in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        return 0

    return _run(go)


def _read_mesh(path: str, z_up: bool, field: str = "mesh"):
    """``(vertices, faces, per-vertex uv or None, y_up)`` of a mesh file; Y-up unless the format is Z-up or
    ``z_up`` says so."""
    import numpy as np
    import trimesh

    from ..errors import BadInput

    if not Path(path).is_file():
        raise BadInput(f"{path}: mesh file not found.", field=field)
    try:
        loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises many types for bad files
        raise BadInput(f"{path}: cannot read mesh: {e}", field=field) from e
    v = np.asarray(loaded.vertices)
    f = np.asarray(loaded.faces)
    uv = getattr(loaded.visual, "uv", None)
    uv = None if uv is None or len(uv) != len(v) else np.asarray(uv)
    y_up = Path(path).suffix.lower() in (".glb", ".gltf", ".obj", ".ply", ".stl") and not z_up
    return v, f, uv, y_up


def _cmd_upscale(args: argparse.Namespace) -> int:
    def go() -> int:
        from . import JobState

        _request(args, "upscale")
        state = JobState.load(args.job_dir)
        pipe = _open(args)
        res = pipe.upscale(state, stage_params=_stage_params(args), progress=_progress(args.quiet))
        _export_generation(res, args, pipe.device)
        return 0

    return _run(go)


def _cmd_texture(args: argparse.Namespace) -> int:
    def go() -> int:
        from .export import write_glb

        _request(args, "texture")
        _check_image(args.image)
        v, f, uv, y_up = _read_mesh(args.mesh, args.z_up)
        pipe = _open(args, texturing_only=True)
        res = pipe.texture(v, f, args.image, uvs=uv, y_up=y_up, seed=args.seed, resolution=args.resolution,
                           texture_size=args.texture_size, stage_params=_stage_params(args),
                           progress=_progress(args.quiet), background=args.background)
        # the GLB keeps the input's own frame and scale (only the textures are new)
        write_glb(args.output, res.vertices, res.faces, res.uvs, res.base_color, res.metallic_roughness,
                  z_up=not y_up)
        print(f"wrote {args.output}: {len(res.vertices)} vertices, UVs {'created' if res.uv_created else 'kept'}, "
              f"coverage {res.coverage:.1%}", file=sys.stderr)
        return 0

    return _run(go)


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from .tiny import write_tiny_pipeline

    path = write_tiny_pipeline(args.folder, seed=args.seed, official_precision=args.official_precision)
    print(f"wrote tiny pipeline to {path}")
    return 0


def add_make_tiny_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``make-tiny`` (also ``python -m backend.tiny_checkpoints``)."""
    p.add_argument("folder", help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official-precision", action="store_true",
                   help="bf16 flows / fp16 VAEs in configs and files, as the official checkpoints")
    p.set_defaults(func=_cmd_make_tiny)


def register(subparsers: Any) -> None:
    """Add ``generate``, ``texture``, ``upscale`` and ``make-tiny``."""
    p = subparsers.add_parser("generate", help="image(s) → textured GLB")
    p.add_argument("image", nargs="+", help="input image; several images = views of one object (--multiview)")
    p.add_argument("--multiview", default="stochastic", choices=MULTIVIEW_MODES,
                   help="how several views combine: stochastic (one view per sampler step, cycling) or "
                        "multidiffusion (every step averages all views; one pass per view)")
    p.add_argument("--guide-mesh", help="blockout mesh (.glb/.obj/.ply…) that decides the rough shape; the result "
                                        "is written in its frame and size")
    p.add_argument("--guide-strength", type=float, default=1.0,
                   help="1 (default): the blockout is the structure; lower: SDEdit from it (needs the TRELLIS v1 "
                        "ss_enc_conv3d_16l8_fp16 next to the SS decoder)")
    p.add_argument("--guide-z-up", action="store_true", help="the guide mesh file is already Z-up")
    p.add_argument("-o", "--output", required=True, help="output .glb")
    p.add_argument("--pipeline", default=None, choices=PIPELINE_TYPES,
                   help="pipeline type (default: pipeline.json's default_pipeline_type)")
    p.add_argument("--decimate", type=int, default=None, help="target face count")
    p.add_argument("--save-job", help="folder to save the job state into (for `trellis2 upscale`)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_generate)

    p = subparsers.add_parser("texture", help="texture an existing mesh from an image → GLB")
    p.add_argument("mesh")
    p.add_argument("image")
    p.add_argument("-o", "--output", required=True, help="output .glb")
    p.add_argument("--resolution", type=int, default=1024,
                   help="O-Voxel grid: 512, 1024 (default) or 1536 (any multiple of 64 up to 2048)")
    p.add_argument("--z-up", action="store_true", help="the mesh file is already Z-up")
    _add_model_args(p)
    p.set_defaults(func=_cmd_texture)

    p = subparsers.add_parser("upscale", help="1536 cascade from a saved job folder → GLB")
    p.add_argument("job_dir")
    p.add_argument("-o", "--output", required=True, help="output .glb")
    p.add_argument("--decimate", type=int, default=None, help="target face count")
    p.add_argument("--save-job", help="folder to save the new job state into")
    _add_model_args(p)
    p.set_defaults(func=_cmd_upscale)

    p = subparsers.add_parser("make-tiny", help="write tiny random checkpoints in the official layout")
    add_make_tiny_args(p)
