"""``trellis2 ovoxel encode|decode|info``: mesh files <-> O-Voxel files from the command line.

Registration imports nothing heavy; the commands import ``backend.mesh_io`` (trimesh, Pillow) lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(subparsers) -> None:
    p = subparsers.add_parser("ovoxel", help="O-Voxel codec: encode meshes, decode O-Voxel files",
                              description="Mesh <-> O-Voxel (TRELLIS.2 flexible dual grid + PBR attributes)")
    sub = p.add_subparsers(dest="ovoxel_command", metavar="ACTION")

    e = sub.add_parser("encode", help="mesh file (.glb/.gltf/.obj/.ply) -> O-Voxel file (.npz/.vxz)")
    e.add_argument("mesh", help="input mesh")
    e.add_argument("-r", "--resolution", type=int, default=256, help="grid resolution R (default 256)")
    e.add_argument("-o", "--output", required=True, help="output .npz (or .vxz)")
    e.add_argument("--texture", default=None, help="base colour image for meshes without materials (needs UVs)")
    e.add_argument("--no-normalize", action="store_true",
                   help="use the mesh coordinates as they are (must lie in [-0.5, 0.5]^3)")
    e.add_argument("--no-pbr", action="store_true", help="geometry only (no PBR attributes)")
    e.add_argument("--quantize", action="store_true", help="store uint8 offsets/attributes (official training layout)")
    e.add_argument("--order", choices=("lex", "morton"), default="lex", help="voxel row order (default lex)")
    e.add_argument("--compress", type=int, default=1, choices=range(10), metavar="0-9",
                   help=".npz deflate level (default 1: fast; 0 = uncompressed, 9 = smallest)")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="O-Voxel file -> mesh (.glb/.ply/.obj): normals, base colour + alpha as vertex "
                                      "colours, per-vertex metallic/roughness (.glb); the Blender importer's decoder")
    d.add_argument("input", help="input .npz (or .vxz)")
    d.add_argument("-o", "--output", required=True, help="output .glb, .ply or .obj")
    d.add_argument("--official", action="store_true",
                   help="official flexible_dual_grid_to_mesh output (no orientation fix, all vertices kept)")
    d.add_argument("--keep-normalized", action="store_true",
                   help="do not map back to the source mesh's coordinates (when the encoder normalised it)")
    d.add_argument("--no-fill-holes", action="store_true",
                   help="keep holes shorter than 3%% of the box open (the official post-decode step fills them)")
    d.set_defaults(func=_decode)

    i = sub.add_parser("info", help="print an O-Voxel file's header and statistics as JSON")
    i.add_argument("input")
    i.set_defaults(func=_info)

    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])


def _encode(args) -> int:
    from ..mesh_io import MeshIOError, load_mesh
    from . import OVoxelError, encode_mesh, save

    t0 = time.perf_counter()
    try:
        mesh = load_mesh(args.mesh, base_color_texture=args.texture)
        t1 = time.perf_counter()
        ov = encode_mesh(mesh, args.resolution, normalize=not args.no_normalize, pbr=not args.no_pbr,
                         order=args.order)
        t2 = time.perf_counter()
        ov.meta["source"] = str(args.mesh)
        if args.output.lower().endswith(".vxz"):
            save(args.output, ov)
        else:
            save(args.output, ov, quantize=args.quantize, compress=args.compress)
    except (OVoxelError, MeshIOError, OSError) as e:
        print(f"trellis2 ovoxel encode: error: {e}", file=sys.stderr)
        return 1
    st = ov.meta.get("encode_stats", {})
    t3 = time.perf_counter()
    pbr_s = st.get("timing", {}).get("pbr", 0.0)
    print(f"{args.mesh}: {st.get('faces', 0)} faces -> {ov.num_voxels} voxels at R={ov.resolution} "
          f"({t3 - t0:.2f} s: load {t1 - t0:.2f}, geometry {t2 - t1 - pbr_s:.2f}, pbr {pbr_s:.2f}, "
          f"write {t3 - t2:.2f}) -> {args.output}")
    return 0


def _decode(args) -> int:
    from ..mesh_io import MeshIOError, save_mesh
    from . import OVoxelError, load
    from .asset import decode_asset

    t0 = time.perf_counter()
    try:
        ov = load(args.input)
        dec = decode_asset(ov, fill_holes=not (args.official or args.no_fill_holes), official=args.official,
                           frame="normalized" if args.keep_normalized else "source")
        colors = mr = None
        if dec.attrs is not None:
            colors = dec.attrs[:, [0, 1, 2, 5]]
            mr = dec.attrs[:, 3:5]
        save_mesh(args.output, dec.vertices, dec.faces, colors, dec.normals, mr)
    except (OVoxelError, MeshIOError, OSError, ValueError) as e:
        print(f"trellis2 ovoxel decode: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.input}: {ov.num_voxels} voxels -> {dec.vertices.shape[0]} vertices, {dec.faces.shape[0]} faces "
          f"({time.perf_counter() - t0:.2f} s) -> {args.output}")
    return 0


def _info(args) -> int:
    from . import OVoxelError, load

    try:
        ov = load(args.input)
    except (OVoxelError, OSError) as e:
        print(f"trellis2 ovoxel info: error: {e}", file=sys.stderr)
        return 1
    info = {"resolution": ov.resolution, "aabb": ov.aabb.tolist(), "voxels": ov.num_voxels,
            "flags": int(ov.intersected.sum()), "split_weight": ov.split_weight is not None,
            "sides": ov.sides is not None,
            "attrs": None if ov.attrs is None else list(ov.attrs.shape), "meta": ov.meta}
    print(json.dumps(info, indent=1, default=str))
    return 0


__all__ = ["register", "argparse"]
