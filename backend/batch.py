"""``trellis2 batch``: many images → GLBs, on a Ray cluster (one actor per GPU) or in this process.

Inputs: a folder of images (each × every ``--pipeline`` × every ``--seeds``), or a manifest —
CSV (header row) or JSONL (one object a line) with the columns ``image`` (required; relative paths
are relative to the manifest), ``seed``, ``pipeline``, ``stage_params`` (JSON object, or columns
``<stage>.<param>`` such as ``shape_slat.steps``), ``texture_size``, ``decimate``, ``background``,
``id`` and ``mesh`` (texture-only: the image textures that mesh instead of generating one).

Outputs (written by the driver as each item finishes): ``OUT/<id>.glb`` and the item's folder
``OUT/jobs/<id>/item.json`` (request, status ``done``/``failed``, error, seconds, worker, result
meta). A rerun skips items whose ``item.json`` says ``done`` and whose GLB exists (resumable);
failed items are tried again. ``OUT/summary.json`` and a table on stderr close the run.

Workers (:class:`BatchWorker`) load the pipeline once and take items one by one. With Ray each is an
actor (``num_gpus=1`` when the cluster has GPUs); images and meshes travel to it as bytes and the
GLB comes back as bytes, so no shared file system is needed. Ray is optional
(``pip install trellis2-blender-backend[ray]``); ``--local N`` runs the same list in this process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import queue
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .contract import DEFAULT_SEED, PIPELINE_TYPES
from .errors import BadInput

__all__ = ["BatchItem", "BatchWorker", "load_items", "run_batch", "register", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_ID_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_ITEM_FIELDS = ("texture_size", "decimate", "background", "resolution")


@dataclass
class BatchItem:
    """One job of a batch: an image (and optionally a mesh to texture) with its settings."""

    id: str
    image: str
    seed: int = DEFAULT_SEED
    pipeline: str = "1024_cascade"
    stage_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    mesh: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "texture" if self.mesh else "generate"


# --------------------------------------------------------------------------------------------------
# job list


def _stage_params_of(row: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    from .validation import stage_params

    sp: Any = row.get("stage_params") or {}
    if isinstance(sp, str):
        try:
            sp = json.loads(sp)
        except ValueError:
            raise BadInput(f"{where}: stage_params is not JSON: {sp!r}", field="stage_params") from None
    sp = {k: dict(v) for k, v in sp.items()} if isinstance(sp, dict) else sp
    for key, value in row.items():
        if isinstance(key, str) and "." in key and value not in (None, ""):
            stage, param = key.split(".", 1)
            sp.setdefault(stage, {})[param] = json.loads(value) if isinstance(value, str) else value
    try:
        return stage_params("stage_params", sp) if sp else {}
    except BadInput as e:
        raise BadInput(f"{where}: {e.message}", field="stage_params") from None


def _rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), 2):
                yield f"{path.name}:{n}", {k.strip(): (v.strip() if isinstance(v, str) else v)
                                           for k, v in row.items() if k}
    else:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise BadInput(f"{path.name}:{n}: not JSON ({e})", field="inputs") from None
                    if not isinstance(row, dict):
                        raise BadInput(f"{path.name}:{n}: not a JSON object", field="inputs")
                    yield f"{path.name}:{n}", row


def _unique_id(base: str, taken: set[str]) -> str:
    base = _ID_BAD.sub("_", base).strip("._-")[:100] or "item"
    out, k = base, 2
    while out in taken:
        out, k = f"{base}-{k}", k + 1
    taken.add(out)
    return out


def load_items(inputs: str | os.PathLike, *, pipelines: Sequence[str] = ("1024_cascade",),
               seeds: Sequence[int] = (DEFAULT_SEED,), defaults: dict[str, Any] | None = None) -> list[BatchItem]:
    """The batch's job list from a folder of images or a CSV/JSONL manifest (checked before anything
    runs: a bad row raises :class:`BadInput` naming the file and line)."""
    from .validation import validate_request

    src = Path(inputs).expanduser()
    defaults = dict(defaults or {})
    for p in pipelines:
        if p not in PIPELINE_TYPES:
            raise BadInput(f"unknown pipeline {p!r} (one of {', '.join(PIPELINE_TYPES)})", field="pipeline")
    taken: set[str] = set()
    items: list[BatchItem] = []
    if src.is_dir():
        images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        many = len(pipelines) > 1 or len(seeds) > 1
        for img in images:
            for pipe in pipelines:
                for seed in seeds:
                    base = f"{img.stem}-{pipe}-s{seed}" if many else img.stem
                    items.append(BatchItem(_unique_id(base, taken), str(img), int(seed), pipe,
                                           settings=dict(defaults)))
        return items
    if not src.is_file():
        raise BadInput(f"{src}: no such folder or manifest", field="inputs")
    if src.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise BadInput(f"{src}: a manifest must be .csv or .jsonl", field="inputs")
    for where, row in _rows(src):
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise BadInput(f"{where}: no image", field="image")
        img = (src.parent / image) if not Path(image).is_absolute() else Path(image)
        mesh = row.get("mesh") or None
        if mesh:
            mesh = str(src.parent / mesh) if not Path(mesh).is_absolute() else mesh
        pipe = row.get("pipeline") or pipelines[0]
        seed_v = row.get("seed")
        settings = dict(defaults)
        for key in _ITEM_FIELDS:
            if row.get(key) not in (None, ""):
                settings[key] = row[key] if key == "background" else int(row[key])
        try:
            seed = int(seed_v) if seed_v not in (None, "") else int(seeds[0])
            req = {"type": "texture" if mesh else "generate", "seed": seed, "stage_params": {},
                   "texture_size": settings.get("texture_size"), "background": settings.get("background")}
            if not mesh:
                req["pipeline_type"] = pipe
            validate_request(req, partial=True)
        except (ValueError, BadInput) as e:
            raise BadInput(f"{where}: {getattr(e, 'message', e)}", field="inputs") from None
        sp = _stage_params_of(row, where)
        base = str(row.get("id") or f"{img.stem}-{pipe}-s{seed}")
        items.append(BatchItem(_unique_id(base, taken), str(img), seed, pipe, sp, mesh, settings))
    return items


# --------------------------------------------------------------------------------------------------
# worker


class BatchWorker:
    """Loads the pipeline once (on the first item) and turns items into GLB bytes.

    ``run`` never raises for an item's own failure: it returns ``{"ok": False, "error", "kind"}``.
    """

    def __init__(self, model_dir: str, *, device: str = "auto", precision: str = "auto", low_vram: bool = False,
                 dinov3_dir: str | None = None, rembg_dir: str | None = None, max_tokens: int | None = None) -> None:
        self.options = {"device": device, "precision": precision, "low_vram": low_vram, "dinov3_dir": dinov3_dir,
                        "rembg_dir": rembg_dir}
        self.model_dir = model_dir
        self.max_tokens = max_tokens
        self._pipe: Any = None
        self.name = f"{os.uname().nodename if hasattr(os, 'uname') else 'host'}:{os.getpid()}"

    def pipeline(self) -> Any:
        if self._pipe is None:
            from .pipelines import load_pipeline
            from .pipelines.pipeline import token_budget

            self._pipe = load_pipeline(self.model_dir, **self.options)
            self._pipe.max_num_tokens = token_budget(self.max_tokens)
        return self._pipe

    def describe(self) -> dict[str, Any]:
        return {"worker": self.name, "device": str(self.pipeline().device)}

    def run(self, item: dict[str, Any], image: bytes, mesh: bytes | None = None) -> dict[str, Any]:
        """Run one item (``asdict(BatchItem)``; the image and mesh file contents as bytes)."""
        t0 = time.perf_counter()
        try:
            glb, meta = self._run(item, image, mesh)
            return {"ok": True, "glb": glb, "meta": meta, "seconds": round(time.perf_counter() - t0, 3),
                    "worker": self.name}
        except Exception as exc:  # noqa: BLE001 - an item's failure is data, the worker goes on
            from .server import classify_error

            kind, message, _ = classify_error(exc)
            return {"ok": False, "kind": kind, "error": message, "seconds": round(time.perf_counter() - t0, 3),
                    "worker": self.name}

    def _run(self, item: dict[str, Any], image: bytes, mesh: bytes | None) -> tuple[bytes, dict[str, Any]]:
        from .intake import check_image_bytes
        from .pipelines.export import generation_to_textured_mesh, write_glb
        from .pipelines.preprocess import load_image

        check_image_bytes(image, f"the image of {item['id']}")
        settings = item.get("settings") or {}
        pipe = self.pipeline()
        with tempfile.TemporaryDirectory(prefix="trellis2-batch-") as tmp:
            src = Path(tmp) / "image"
            src.write_bytes(image)
            img = load_image(src)
            out = Path(tmp) / "out.glb"
            if mesh is not None:
                import trimesh

                mpath = Path(tmp) / ("mesh" + Path(item["mesh"]).suffix)
                mpath.write_bytes(mesh)
                try:
                    m = trimesh.load(str(mpath), force="mesh", process=False)
                except Exception as e:  # noqa: BLE001 - trimesh raises many types for bad files
                    raise BadInput(f"cannot read the mesh {item['mesh']}: {e}", field="mesh") from e
                y_up = mpath.suffix.lower() in (".glb", ".gltf", ".obj", ".ply", ".stl")
                res = pipe.texture(m.vertices, m.faces, img, y_up=y_up, seed=int(item["seed"]),
                                   resolution=int(settings.get("resolution") or 1024),
                                   texture_size=int(settings.get("texture_size") or 2048),
                                   stage_params=item.get("stage_params") or {},
                                   background=settings.get("background") or "auto")
                write_glb(out, res.vertices, res.faces, res.uvs, res.base_color, res.metallic_roughness, z_up=not y_up)
                meta = {"kind": "texture", "coverage": float(res.coverage), "vertices": int(len(res.vertices))}
            else:
                res = pipe.generate(img, item["pipeline"], seed=int(item["seed"]),
                                    stage_params=item.get("stage_params") or {},
                                    background=settings.get("background") or "auto")
                v, f, uv, base, mr = generation_to_textured_mesh(
                    res, texture_size=int(settings.get("texture_size") or 2048),
                    decimate=int(settings.get("decimate") or 0) or None, device=pipe.device)
                write_glb(out, v, f, uv, base, mr)
                meta = {"kind": "generate", "pipeline": res.pipeline_type, "resolution": int(res.resolution),
                        "voxels": int(res.coords.shape[0]), "vertices": int(len(v)), "faces": int(len(f)),
                        "timings": {k: round(float(t), 3) for k, t in res.timings.items()}}
            return out.read_bytes(), meta


# --------------------------------------------------------------------------------------------------
# driver


class _Progress:
    """A one-line progress bar on stderr (rewritten in place on a terminal, every 10 % otherwise)."""

    def __init__(self, total: int, stream=None, enabled: bool = True) -> None:
        self.total, self.done, self.failed, self.skipped = total, 0, 0, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.t0 = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, ok: bool | None) -> None:
        if ok is None:
            self.skipped += 1
        elif ok:
            self.done += 1
        else:
            self.failed += 1
        if not self.enabled:
            return
        n = self.done + self.failed + self.skipped
        run = self.done + self.failed
        el = time.monotonic() - self.t0
        eta = el / run * (self.total - n) if run else 0.0
        width = 30
        bar = "#" * int(width * n / self.total)
        line = (f"[{bar:<{width}}] {n}/{self.total}  done {self.done}  failed {self.failed}  "
                f"skipped {self.skipped}  {el:6.1f}s  ETA {eta:6.1f}s")
        decile = 10 * n // self.total
        if self.tty:
            print("\r" + line, end="\n" if n == self.total else "", file=self.stream, flush=True)
        elif decile != self._last_decile or n == self.total:
            self._last_decile = decile
            print(line, file=self.stream, flush=True)


def _item_dir(out: Path, item: BatchItem) -> Path:
    return out / "jobs" / item.id


def _is_finished(out: Path, item: BatchItem) -> bool:
    try:
        rec = json.loads((_item_dir(out, item) / "item.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return rec.get("status") == "done" and (out / f"{item.id}.glb").is_file()


def _record(out: Path, item: BatchItem, res: dict[str, Any]) -> dict[str, Any]:
    """Write the item's outcome (GLB, then ``item.json``, both atomically) and return its summary row."""
    from .jobs import atomic_write_bytes, atomic_write_json

    folder = _item_dir(out, item)
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"id": item.id, "request": asdict(item), "status": "done" if res.get("ok") else "failed",
           "seconds": res.get("seconds"), "worker": res.get("worker"), "finished": time.time()}
    if res.get("ok"):
        atomic_write_bytes(out / f"{item.id}.glb", res["glb"])
        rec["meta"], rec["glb"] = res.get("meta") or {}, f"{item.id}.glb"
    else:
        rec["error"] = {"kind": res.get("kind", "internal"), "message": res.get("error", "")}
    atomic_write_json(folder / "item.json", rec)
    return {"id": item.id, "status": rec["status"], "seconds": rec["seconds"], "worker": rec["worker"],
            "error": (rec.get("error") or {}).get("message")}


def _inputs_of(item: BatchItem) -> tuple[bytes, bytes | None]:
    """The item's files as bytes (the driver reads them: workers may be on other machines)."""
    from .intake import read_image_source

    image = read_image_source(item.image)
    mesh = None
    if item.mesh:
        try:
            mesh = Path(item.mesh).read_bytes()
        except OSError as e:
            raise BadInput(f"cannot read the mesh {item.mesh}: {e.strerror or e}", field="mesh") from None
    return image, mesh


def _failed(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "kind": "bad_input" if isinstance(exc, BadInput) else "internal",
            "error": getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}", "seconds": 0.0,
            "worker": "driver"}


def run_batch(items: Sequence[BatchItem], out_dir: str | os.PathLike, *,
              worker_factory: Callable[[], BatchWorker] | None = None, worker_kwargs: dict[str, Any] | None = None,
              ray_address: str | None = None, actors: int | None = None, local: int = 1,
              progress: bool = True, stream=None) -> dict[str, Any]:
    """Run ``items`` into ``out_dir`` (skipping finished ones); returns the summary (also ``summary.json``).

    ``ray_address``: run on Ray (``"auto"``, ``"ray://host:10001"``, or ``"local"`` to start a local
    cluster; an already initialised Ray session is used as is), ``actors`` of them (default: one per
    GPU of the cluster, or 1). Otherwise ``local`` workers run in this process (threads)."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not _is_finished(out, it)]
    bar = _Progress(len(items), stream, progress)
    rows: list[dict[str, Any]] = [{"id": it.id, "status": "skipped", "seconds": None, "worker": None, "error": None}
                                  for it in items if it not in todo]
    for _ in rows:
        bar.update(None)
    t0 = time.monotonic()

    def finish(item: BatchItem, res: dict[str, Any]) -> None:
        rows.append(_record(out, item, res))
        bar.update(bool(res.get("ok")))

    if todo:
        if ray_address is not None:
            _run_ray(todo, finish, worker_kwargs or {}, ray_address, actors)
        else:
            _run_local(todo, finish, worker_factory or (lambda: BatchWorker(**(worker_kwargs or {}))), max(1, local))
    order = {it.id: k for k, it in enumerate(items)}
    rows.sort(key=lambda r: order.get(r["id"], 0))
    summary = {"total": len(items), "done": sum(r["status"] == "done" for r in rows),
               "failed": sum(r["status"] == "failed" for r in rows),
               "skipped": sum(r["status"] == "skipped" for r in rows),
               "seconds": round(time.monotonic() - t0, 3), "items": rows}
    from .jobs import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    return summary


def _run_local(todo: Sequence[BatchItem], finish: Callable[[BatchItem, dict[str, Any]], None],
               factory: Callable[[], BatchWorker], n: int) -> None:
    """``n`` workers in this process (threads; one pipeline each), results recorded as they finish."""
    jobs: queue.Queue[BatchItem | None] = queue.Queue()
    for it in todo:
        jobs.put(it)
    lock = threading.Lock()

    def loop() -> None:
        worker = factory()
        while True:
            try:
                it = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                image, mesh = _inputs_of(it)
                res = worker.run(asdict(it), image, mesh)
            except Exception as exc:  # noqa: BLE001
                res = _failed(exc)
            with lock:
                finish(it, res)

    threads = [threading.Thread(target=loop, name=f"batch-{k}", daemon=True) for k in range(min(n, len(todo)))]
    if len(threads) == 1:
        loop()   # the common case: no thread at all (Ctrl-C stays immediate)
        return
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_ray(todo: Sequence[BatchItem], finish: Callable[[BatchItem, dict[str, Any]], None],
             worker_kwargs: dict[str, Any], address: str, actors: int | None) -> None:
    """One actor per GPU (or ``actors``), each loading the pipeline once; one item in flight per actor."""
    try:
        import ray
    except ImportError:
        raise BadInput("Ray is not installed: pip install 'trellis2-blender-backend[ray]' (or use --local N).",
                       field="ray") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False,
                 log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = max(1, min(actors or gpus or 1, len(todo)))
    actor_cls = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_restarts=1)(BatchWorker)
    pool = [actor_cls.remote(**worker_kwargs) for _ in range(n)]
    pending = list(todo)
    inflight: dict[Any, tuple[Any, BatchItem]] = {}

    def feed(actor: Any) -> None:
        while pending:
            it = pending.pop(0)
            try:
                image, mesh = _inputs_of(it)
            except Exception as exc:  # noqa: BLE001 - unreadable input: recorded, next item
                finish(it, _failed(exc))
                continue
            inflight[actor.run.remote(asdict(it), image, mesh)] = (actor, it)
            return

    for actor in pool:
        feed(actor)
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        ref = ready[0]
        actor, it = inflight.pop(ref)
        try:
            res = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the actor died under this item (OOM kill, node lost)
            res = {"ok": False, "kind": "crashed", "error": f"worker lost: {type(exc).__name__}: {exc}",
                   "seconds": None, "worker": "ray"}
        finish(it, res)
        feed(actor)
    for actor in pool:
        ray.kill(actor)


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a text table (one row per item, then the totals)."""
    rows = [("item", "status", "seconds", "error")]
    for r in summary["items"]:
        sec = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        rows.append((r["id"], r["status"], sec, (r.get("error") or "")[:80]))
    widths = [max(len(str(row[k])) for row in rows) for k in range(3)]
    lines = ["  ".join(str(row[k]).ljust(widths[k]) for k in range(3)) + "  " + row[3] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  -----")
    lines.append(f"{summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped "
                 f"of {summary['total']} in {summary['seconds']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def _cmd_batch(args: argparse.Namespace) -> int:
    if args.ray is not None and args.local is not None:
        raise BadInput("choose --ray ADDRESS or --local N, not both", field="ray")
    defaults = {"texture_size": args.texture_size, "decimate": args.decimate, "background": args.background}
    items = load_items(args.inputs, pipelines=args.pipeline or ["1024_cascade"], seeds=args.seeds or [DEFAULT_SEED],
                       defaults={k: v for k, v in defaults.items() if v is not None})
    if not items:
        raise BadInput(f"{args.inputs}: no images found", field="inputs")
    kwargs = {"model_dir": args.model_dir, "device": args.device, "precision": args.precision,
              "low_vram": args.low_vram, "dinov3_dir": args.dinov3_dir, "rembg_dir": args.rembg_dir,
              "max_tokens": args.max_tokens}
    summary = run_batch(items, args.output, worker_kwargs=kwargs, ray_address=args.ray, actors=args.actors,
                        local=args.local or 1, progress=not args.quiet)
    print(format_table(summary), file=sys.stderr)
    return 0 if summary["failed"] == 0 else 3


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``batch`` subcommand (no torch or ray import here)."""
    p = subparsers.add_parser("batch", help="generate many assets (a folder or a CSV/JSONL manifest), on Ray or locally",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("inputs", help="folder of images, or a .csv / .jsonl manifest")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="GLBs, job folders, summary.json")
    p.add_argument("--model", "--model-dir", dest="model_dir", required=True, help="TRELLIS.2 pipeline folder")
    p.add_argument("--pipeline", nargs="+", choices=PIPELINE_TYPES, help="pipeline(s) (default 1024_cascade)")
    p.add_argument("--seeds", nargs="+", type=int, help="seed(s) for every image of a folder (default 42)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ray", metavar="ADDRESS", help="run on Ray: auto | ray://HOST:10001 | local")
    where.add_argument("--local", type=int, metavar="N", help="run in this process with N workers (default 1)")
    p.add_argument("--actors", type=int, help="Ray actors (default: one per GPU of the cluster)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (each worker's device)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--low-vram", action="store_true")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--dinov3-dir")
    p.add_argument("--rembg-model", dest="rembg_dir")
    p.add_argument("--texture-size", type=int, default=None, help="default 2048")
    p.add_argument("--decimate", type=int, default=None, help="target faces")
    p.add_argument("--background", choices=("auto", "remove", "keep"), default=None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_batch)
