"""Pure-Python core of the panel's decisions (no bpy): which actions an error offers, presets,
history titles and stale jobs, and the whole-job progress/ETA learned from previous runs.

Everything here is plain data in, plain data out, so it is testable without Blender and the
bpy modules (UI, operators) only draw or apply what it decides.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Optional

from .backend.jobs import atomic_write_bytes

# -- errors ----------------------------------------------------------------------------------------

#: Error kinds that mean the backend process itself failed: the only ones a restart can fix.
BACKEND_FAILURES = frozenset({"crashed", "protocol", "timeout", "start_failed", "polling"})
#: Error kinds fixed in the add-on preferences (paths, model folders, environment).
SETUP_FAILURES = frozenset({"not_configured", "missing_weights", "missing_dependency", "start_failed"})


def error_actions(kind: str, backend_state: str = "", has_log: bool = False) -> list[str]:
    """The actions an error box offers, in drawing order (each one can help with this error):

    ``fp32`` (NaN/Inf: switch precision), ``low_vram`` / ``lower_pipeline`` (out of memory),
    ``preferences`` (setup problems), ``check_backend`` (a package is missing), ``log`` (when a log
    exists and the error came from the backend), ``restart`` (only for backend failures, or an
    error without a kind while the backend is down), ``dismiss`` (always)."""
    actions: list[str] = []
    if kind == "numerical":
        actions.append("fp32")
    if kind == "oom":
        actions += ["low_vram", "lower_pipeline"]
    if kind in SETUP_FAILURES:
        actions.append("preferences")
    if kind == "missing_dependency":
        actions.append("check_backend")
    user_side = kind in ("bad_input", "not_configured", "import")
    if has_log and not user_side:
        actions.append("log")
    if kind in BACKEND_FAILURES or (not kind and backend_state == "CRASHED"):
        actions.append("restart")
    actions.append("dismiss")
    return actions


# -- presets ---------------------------------------------------------------------------------------

#: Scene settings a preset stores (``Scene.trellis2`` property names).
PRESET_FIELDS = ("pipeline", "ss_steps", "ss_guidance", "shape_steps", "shape_guidance", "tex_steps",
                 "tex_guidance", "material_mode", "decimation_target", "texture_size")
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "Draft": {"pipeline": "512", "ss_steps": 8, "ss_guidance": 7.5, "shape_steps": 8, "shape_guidance": 7.5,
              "tex_steps": 8, "tex_guidance": 1.0, "material_mode": "VERTEX", "decimation_target": 200_000,
              "texture_size": "1024"},
    "Standard": {"pipeline": "1024_cascade", "ss_steps": 12, "ss_guidance": 7.5, "shape_steps": 12,
                 "shape_guidance": 7.5, "tex_steps": 12, "tex_guidance": 1.0, "material_mode": "TEXTURES",
                 "decimation_target": 500_000, "texture_size": "2048"},
    "Best": {"pipeline": "1536_cascade", "ss_steps": 16, "ss_guidance": 7.5, "shape_steps": 16,
             "shape_guidance": 7.5, "tex_steps": 16, "tex_guidance": 1.0, "material_mode": "TEXTURES",
             "decimation_target": 1_000_000, "texture_size": "4096"},
}


def preset_values(source: Any) -> dict[str, Any]:
    """The preset fields of a settings object (attribute access) as a JSON-able dict."""
    return {f: getattr(source, f) for f in PRESET_FIELDS}


def encode_preset(values: dict[str, Any]) -> str:
    return json.dumps({k: values[k] for k in PRESET_FIELDS if k in values}, sort_keys=True)


def decode_preset(text: str) -> dict[str, Any]:
    """A stored preset's values (unknown keys dropped; {} when unreadable)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if k in PRESET_FIELDS} if isinstance(data, dict) else {}


def matching_preset(values: dict[str, Any], presets: dict[str, dict[str, Any]]) -> str:
    """Name of the first preset whose every stored value equals ``values`` ('' when none)."""
    for name, stored in presets.items():
        if stored and all(_same(values.get(k), v) for k, v in stored.items()):
            return name
    return ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-4
        except (TypeError, ValueError):
            return False
    return a == b


# -- history ---------------------------------------------------------------------------------------

STALE_STATUSES = ("running", "queued")
INTERRUPTED_MESSAGE = "The backend stopped before the job finished"


def history_title(settings: dict, source_title: str = "") -> str:
    """What a history item is called: its input image's name (an upscale: its source's)."""
    image = settings.get("image") or (settings.get("images") or [""])[0]
    stem = os.path.splitext(os.path.basename(str(image)))[0] if image else ""
    return stem or source_title


def stale_jobs(entries: Iterable[dict], live: Iterable[str]) -> list[dict]:
    """History entries still ``running``/``queued`` although no live backend of ours owns them."""
    live = set(live)
    return [e for e in entries if e.get("status") in STALE_STATUSES and e.get("job") not in live]


def mark_failed(job_json: Path, message: str = INTERRUPTED_MESSAGE) -> bool:
    """Rewrite a stale job's ``job.json`` as failed (atomically); False when it is unreadable or no
    longer running (another backend finished it meanwhile)."""
    try:
        meta = json.loads(Path(job_json).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("status") not in STALE_STATUSES:
        return False
    meta.update(status="failed", updated=time.time(), error={"kind": "interrupted", "message": message})
    try:
        atomic_write_bytes(job_json, json.dumps(meta).encode("utf-8"))
    except OSError:
        return False
    return True


# -- whole-job progress learned from previous runs -------------------------------------------------


class RunTimings:
    """Per-stage and total durations of the last finished jobs of each kind (``timings.json`` in the
    cache folder, so the estimate is this machine's)."""

    KEEP = 5

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        self.data: dict[str, dict] = data if isinstance(data, dict) else {}

    @staticmethod
    def key(kind: str, request: dict) -> str:
        """Jobs that take comparable time: kind, pipeline (or target), output, device."""
        pipe = request.get("pipeline_type") or request.get("target") or request.get("resolution") or ""
        return ":".join(str(x) for x in (kind, pipe, request.get("output", ""), request.get("device", "")))

    def record(self, key: str, stages: list[tuple[str, float]], total: float) -> None:
        """Add one finished run and save (best effort: an unwritable cache only loses the estimate)."""
        entry = self.data.setdefault(key, {"totals": [], "stages": {}, "order": []})
        entry["totals"] = (entry.get("totals", []) + [round(float(total), 3)])[-self.KEEP:]
        for name, seconds in stages:
            runs = entry.setdefault("stages", {}).setdefault(name, [])
            runs.append(round(float(seconds), 3))
            del runs[:-self.KEEP]
        entry["order"] = [name for name, _ in stages]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass

    def estimate(self, key: str) -> Optional[dict]:
        """``{"total", "stages": {name: s}, "order"}`` (medians of the kept runs), or None."""
        entry = self.data.get(key)
        if not entry or not entry.get("totals"):
            return None
        stages = {k: statistics.median(v) for k, v in (entry.get("stages") or {}).items() if v}
        return {"total": statistics.median(entry["totals"]), "stages": stages, "order": list(entry.get("order", []))}


def overall_progress(done_stages: list[tuple[str, float]], stage: str, stage_fraction: float,
                     stage_elapsed: float, elapsed: float, estimate: Optional[dict]) -> tuple[float, Optional[float]]:
    """``(fraction of the whole job, seconds left or None)``.

    With an ``estimate`` (see :meth:`RunTimings.estimate`): time left = the current stage's learned
    duration not yet covered by its step progress (at least what its own pace predicts) plus the
    learned durations of the stages still to come. Without one: the current stage's fraction and no
    whole-job ETA."""
    if not estimate:
        return max(0.0, min(1.0, stage_fraction)), None
    learned = estimate["stages"]
    order = estimate["order"]
    seen = {name for name, _ in done_stages} | {stage}
    current = learned.get(stage)
    if current is not None:
        left_here = max(current * (1.0 - stage_fraction), 0.0)
        if 0.0 < stage_fraction < 1.0:   # the stage's own pace once it has started
            left_here = 0.5 * left_here + 0.5 * stage_elapsed * (1.0 - stage_fraction) / stage_fraction
    else:
        left_here = 0.0
    later = sum(learned.get(s, 0.0) for s in order if s not in seen)
    left = left_here + later
    if current is None and not done_stages and not stage:   # nothing known yet: the learned total
        left = max(estimate["total"] - elapsed, 0.0)
    total = elapsed + left
    return (min(0.99, elapsed / total) if total > 0 else 0.0), left


# -- token budget ----------------------------------------------------------------------------------

_BUDGET = re.compile(r"limited number of tokens \((\d+) allowed\), the resolution is reduced to (\d+)")


def token_budget_note(text: str) -> Optional[dict]:
    """``{"max_tokens", "resolution"}`` from the backend's cascade step-down warning, else None."""
    m = _BUDGET.search(text)
    return {"max_tokens": int(m.group(1)), "resolution": int(m.group(2))} if m else None


def token_budget_text(note: dict, nominal: int) -> str:
    """The panel's note for a cascade whose token budget lowered the resolution."""
    return (f"Max Tokens ({note['max_tokens']}) lowered the resolution {nominal} → {note['resolution']}: "
            f"raise Max Tokens for more detail (more VRAM)")


def random_seed() -> int:
    """A new seed in the panel's range (Blender int properties are 32-bit)."""
    return random.randint(0, 2**31 - 1)
