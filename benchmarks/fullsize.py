"""Write a pipeline folder with random weights at the official sizes (for GPU pipeline benchmarks).

    python -m benchmarks.fullsize /tmp/trellis_full --device cuda      # ~14 GB on disk, ~1 min on an H100
    python benchmarks/pipeline.py --model /tmp/trellis_full --device cuda --types 512 1024_cascade

Model classes, arguments and file dtypes come from the official state-dict manifests
(``official_state_dict/_summary.json``), looked up in ``--manifests``, else ``$TRELLIS_SHARED``,
``../shared`` or ``.gpu_shared`` (the copy that ``scripts/gpu_wheels.sh`` makes for the device machine).
See :func:`backend.pipelines.tiny.write_full_size_pipeline` for what the weights are.
``--tiny-configs`` writes the tiny models through the same code path (a CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def find_manifests(explicit: str | None = None) -> Path:
    cands = [Path(explicit)] if explicit else [
        Path(os.environ["TRELLIS_SHARED"]) / "official_state_dict" if "TRELLIS_SHARED" in os.environ else None,
        REPO.parent / "shared" / "official_state_dict", REPO / ".gpu_shared" / "official_state_dict"]
    for c in cands:
        if c is not None and (c / "_summary.json").is_file():
            return c
    raise SystemExit(f"no official_state_dict/_summary.json in {[str(c) for c in cands if c]}")


def tiny_summary() -> dict:
    from backend.pipelines import tiny

    out = {Path(tiny._ENC_STEM if k == "shape_slat_encoder" else tiny._STEMS[k]).name:
           {"cls": c["name"], "args": c["args"], "file_dtypes": ["float32"]} for k, c in tiny._configs().items()}
    out["dinov3_vitl16_pretrain_lvd1689m"] = {"args": {"hidden_size": 64, "num_hidden_layers": 2,
                                                       "num_attention_heads": 1, "intermediate_size": 128}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="pipeline folder to write")
    ap.add_argument("--manifests", help="official_state_dict folder (default: see module doc)")
    ap.add_argument("--device", default="cuda", help="where the weights are made (cuda: seconds; cpu: minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs=3, default=[12, 12, 12], metavar=("SS", "SHAPE", "TEX"))
    ap.add_argument("--occupancy", type=float, default=0.05, help="fraction of the 64³ SS grid occupied")
    ap.add_argument("--tiny-configs", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from backend.pipelines.tiny import write_full_size_pipeline

    scale = 1.0
    if args.tiny_configs:
        from backend.pipelines.tiny import TINY_SCALE

        summary, scale = tiny_summary(), TINY_SCALE
    else:
        src = find_manifests(args.manifests)
        summary = json.loads((src / "_summary.json").read_text())
        print(f"manifests: {src}")
    t = time.perf_counter()
    root = write_full_size_pipeline(args.out, summary, device=args.device, seed=args.seed,
                                    occupancy=args.occupancy, steps=tuple(args.steps), scale=scale)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    print(f"wrote {root} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
