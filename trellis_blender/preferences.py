"""Add-on preferences: backend Python and environment, model folders, device and cache options.

Operators here: create the backend environment (venv + pip, non-blocking, logged), check the backend
(``trellis2 selftest`` JSON shown in the preferences), open the setup log.
"""

from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, IntProperty, StringProperty

from . import runtime, tasks
from .setup_check import TRELLIS_PG_preset, draw_presets_box, folder_update  # issue 16: presets, folders

ADDON = __package__
PRECISIONS = (
    ("AUTO", "Auto", "bf16 (official) on NVIDIA RTX 30xx / A100 or newer (compute capability 8.0+), "
                     "fp16 on older NVIDIA GPUs (GTX 10xx / RTX 20xx have no bf16), fp32 on the CPU"),
    ("BF16", "bf16", "bfloat16: what the model was trained in; needs an RTX 30xx / A100 or newer"),
    ("FP16", "fp16", "float16: for older GPUs; may overflow (NaN/Inf) in some images"),
    ("FP32", "fp32", "float32: never overflows, but needs about 2× the VRAM of the flow models and is slower"),
)
MAX_TOKENS_DEFAULT = 49152  # the official cascade token budget


def get_prefs(context=None) -> "TRELLIS_AddonPreferences":
    """This add-on's preferences."""
    context = context or bpy.context
    return context.preferences.addons[ADDON].preferences


def cache_dir(prefs=None) -> Path:
    """Job/cache folder: the preference, or the extension's user folder."""
    prefs = prefs or get_prefs()
    if prefs.cache_dir:
        path = Path(bpy.path.abspath(prefs.cache_dir))
    else:
        try:
            path = Path(bpy.utils.extension_path_user(ADDON, path="cache", create=True))
        except (ValueError, AttributeError, TypeError):
            import tempfile

            path = Path(tempfile.gettempdir()) / "trellis2_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_loopback(host: str) -> bool:
    from .backend.transport import is_loopback

    return is_loopback(host.strip())


def default_env_dir() -> str:
    try:
        return bpy.utils.extension_path_user(ADDON, path="backend_env", create=False)
    except (ValueError, AttributeError, TypeError):
        return ""


def _tag_prefs_redraw() -> None:
    for window in getattr(bpy.context.window_manager, "windows", []):
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):
                area.tag_redraw()


def _task_timer():
    """Timer: advance the preference tasks; unregisters itself when none runs."""
    running = False
    for task in (runtime.env_task, runtime.selftest_task, runtime.download_task):
        if task is not None and task.running:
            running = task.poll() or running
    if runtime.selftest_task is not None and not runtime.selftest_task.running:
        runtime.load_selftest_result()
    _tag_prefs_redraw()
    return 0.5 if running else None


def start_task_polling() -> None:
    if not bpy.app.timers.is_registered(_task_timer):
        bpy.app.timers.register(_task_timer, first_interval=0.3, persistent=True)


class TRELLIS_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON

    backend_python: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python interpreter of the backend environment (with torch); the add-on never imports torch")
    env_dir: StringProperty(
        name="Environment folder", subtype="DIR_PATH",
        description="Where 'Create backend environment' makes the venv (empty: the extension's user folder)")
    torch_build: EnumProperty(
        name="Torch build", default="AUTO", items=tasks.TORCH_BUILDS,
        description="Which PyTorch build 'Create backend environment' installs (PyPI's torch is CPU-only "
                    "on Windows; NVIDIA drivers older than 580 need a CUDA 12 build)")
    torch_index_url: StringProperty(
        name="Torch index URL",
        description="pip index (--index-url) torch is installed from when the torch build is 'Custom index', "
                    "e.g. https://download.pytorch.org/whl/cu129")
    model_dir: StringProperty(
        update=folder_update("model_dir", "trellis"),
        name="TRELLIS.2-4B", subtype="DIR_PATH",
        description="Folder of the TRELLIS.2-4B snapshot (pipeline.json + ckpts/)")
    dinov3_dir: StringProperty(
        update=folder_update("dinov3_dir", "dinov3"),
        name="DINOv3", subtype="DIR_PATH", description="Folder of the DINOv3 image encoder weights")
    rembg_dir: StringProperty(
        update=folder_update("rembg_dir", "rembg"),
        name="Background removal", subtype="DIR_PATH",
        description="BiRefNet / RMBG-2.0 folder (model.safetensors), e.g. a download of ZhengPeng7/BiRefNet; "
                    "without it, images need transparency or a plain single-colour background")
    device: EnumProperty(
        name="Device", default="AUTO",
        items=(("AUTO", "Auto", "CUDA when available, else Apple MPS, else CPU"), ("CUDA", "CUDA", "NVIDIA GPU"),
               ("MPS", "Apple GPU (MPS)", "Apple silicon through torch's Metal backend (fp16/fp32)"),
               ("CPU", "CPU", "Very slow; for testing")))
    backend_mode: EnumProperty(
        name="Backend", default="LOCAL",
        items=(("LOCAL", "Local", "Start the backend on this computer (its own Python, over pipes; no network port)"),
               ("REMOTE", "Remote", "Use a backend another machine runs with 'trellis2 serve --listen' (a GPU box)")),
        description="Where generation runs")
    remote_host: StringProperty(name="Host", default="127.0.0.1",
                                description="Name or address of the machine running 'trellis2 serve --listen'")
    remote_port: IntProperty(name="Port", default=47860, min=1, max=65535)
    remote_token: StringProperty(
        name="Token", subtype="PASSWORD",
        description="The token of the remote backend (the content of its --token-file; made with 'trellis2 token')")
    remote_tls: BoolProperty(name="TLS", default=False,
                             description="Encrypt the connection (the backend runs with --tls-cert/--tls-key)")
    remote_ca_file: StringProperty(
        name="CA file", subtype="FILE_PATH",
        description="Certificate to trust for TLS (e.g. the backend's self-signed cert.pem); empty: the system CAs")
    low_vram: BoolProperty(
        name="Low VRAM", default=False,
        description="Keep only the running model on the GPU (slower, fits 16 GB cards)")
    precision: EnumProperty(
        name="Precision", default="AUTO", items=PRECISIONS,
        description="Compute dtype of the flow transformers (changing it reloads the models before the next job)")
    max_tokens: IntProperty(
        name="Max Tokens", default=MAX_TOKENS_DEFAULT, min=1024, max=262144, step=4096,
        description="Token budget of the 1024/1536 cascades (official 49152). Lower needs less VRAM: "
                    "1536 steps its grid down (1408, 1280, … 1024) until it fits. Shape stage, roughly: "
                    "49152 ≈ 9 GB, 32768 ≈ 7 GB, 24576 ≈ 6 GB")
    cache_dir: StringProperty(
        name="Cache folder", subtype="DIR_PATH",
        description="Job folders (inputs, latents, results, logs); empty: the extension's user folder")
    idle_unload_minutes: IntProperty(
        name="Unload after idle (min)", default=10, min=0, max=1440,
        description="Free GPU memory after this many idle minutes (0: never)")
    allow_downloads: BoolProperty(
        name="Allow model downloads", default=False,
        description="Let the backend download missing weights (needs Blender's online access)")
    presets: CollectionProperty(type=TRELLIS_PG_preset, name="Presets",
                                description="Your own panel presets (issue 16)")

    def draw(self, context):
        layout = self.layout
        box = layout.box()
        box.label(text="Backend", icon="CONSOLE")
        box.row().prop(self, "backend_mode", expand=True)
        if self.backend_mode == "REMOTE":
            row = box.row(align=True)
            row.prop(self, "remote_host")
            row.prop(self, "remote_port")
            box.prop(self, "remote_token")
            row = box.row(align=True)
            row.prop(self, "remote_tls")
            sub = row.row()
            sub.enabled = self.remote_tls
            sub.prop(self, "remote_ca_file")
            if not self.remote_tls and not _is_loopback(self.remote_host):
                box.label(text="Without TLS the token, images and meshes cross the network in clear", icon="ERROR")
            box.label(text="Model folders and device are the remote backend's own; images are sent to it",
                      icon="INFO")
        box.prop(self, "backend_python")
        row = box.row(align=True)
        row.operator("trellis.check_backend", icon="CHECKMARK")
        row.operator("trellis.create_backend_env", icon="IMPORT")
        box.prop(self, "env_dir")
        col = box.column(align=True)
        col.prop(self, "torch_build")
        if self.torch_build == "CUSTOM":
            col.prop(self, "torch_index_url")
        col.label(text=tasks.torch_build_hint(self.torch_build), icon="INFO")
        for task in (runtime.env_task, runtime.selftest_task):
            if task is None:
                continue
            col = box.column(align=True)
            if task.running:
                col.progress(factor=task.fraction, type="BAR", text=task.status_text())
            elif task is runtime.selftest_task and runtime.selftest_data is not None:
                ok = bool(runtime.selftest_data.get("ok"))
                col.label(text="Backend check: OK" if ok else "Backend check: problems found",
                          icon="CHECKMARK" if ok else "ERROR")
            else:
                col.label(text=task.status_text(), icon="CHECKMARK" if task.ok else "ERROR")
            op = col.operator("trellis.open_path", text="Open log", icon="TEXT")
            op.path = str(task.log_path)
        if runtime.selftest_lines:
            col = box.column(align=True)
            for line in runtime.selftest_lines[:24]:
                col.label(text=line)

        box = layout.box()
        box.label(text="Models", icon="FILE_FOLDER")
        for prop, kind in (("model_dir", "trellis"), ("dinov3_dir", "dinov3"), ("rembg_dir", "rembg")):
            col = box.column(align=True)
            col.prop(self, prop)
            icon, text = tasks.model_folder_status(bpy.path.abspath(getattr(self, prop)), kind)
            col.label(text=text, icon=icon)
        row = box.row()
        online = bool(getattr(bpy.app, "online_access", False))
        row.enabled = online
        row.prop(self, "allow_downloads")
        row.operator("trellis.download_models", icon="URL").which = "ALL"
        row.operator("trellis.download_models", text="Download BiRefNet", icon="IMAGE_RGB_ALPHA").which = "REMBG"
        if runtime.download_task is not None:
            task = runtime.download_task
            if task.running:
                box.progress(factor=task.fraction, type="BAR", text=task.status_text())
            else:
                box.label(text=task.status_text(), icon="CHECKMARK" if task.ok else "ERROR")
                if not task.ok:
                    for line in task.log_tail(3).splitlines()[-2:]:
                        box.label(text=line[:150])
            box.operator("trellis.open_path", text="Open download log", icon="TEXT").path = str(task.log_path)
        else:
            box.label(text="DINOv3 is gated: accept its licence on huggingface.co and run 'hf auth login' first "
                           "(about 18 GB in all)", icon="INFO")
        if not online:
            box.label(text="Downloads need Online Access (Preferences › System › Network)", icon="INFO")

        box = layout.box()
        box.label(text="Runtime", icon="PREFERENCES")
        box.prop(self, "device")
        box.prop(self, "low_vram")
        box.prop(self, "precision")
        box.prop(self, "max_tokens")
        box.prop(self, "idle_unload_minutes")
        box.prop(self, "cache_dir")
        draw_presets_box(layout, self)   # issue 16: the user's presets


class TRELLIS_OT_create_backend_env(bpy.types.Operator):
    """Make a Python venv, pip-install torch (the chosen build) and the backend requirements (background, logged)"""

    bl_idname = "trellis.create_backend_env"
    bl_label = "Create Backend Environment"

    @classmethod
    def poll(cls, context):
        if runtime.env_task is not None and runtime.env_task.running:
            cls.poll_message_set("The environment is being created")
            return False
        return True

    def execute(self, context):
        prefs = get_prefs(context)
        env_dir = bpy.path.abspath(prefs.env_dir) if prefs.env_dir else default_env_dir()
        if not env_dir:
            self.report({"ERROR"}, "Set an environment folder first")
            return {"CANCELLED"}
        ext_dir = runtime.extension_dir()
        log = cache_dir(prefs) / "logs" / "create_env.log"
        try:
            task = tasks.create_env_task(env_dir, ext_dir, log, build=prefs.torch_build,
                                         custom_url=prefs.torch_index_url)
        except (FileNotFoundError, ValueError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        try:
            runtime.env_task = task.start()
        except OSError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        prefs.backend_python = str(tasks.venv_python(env_dir))
        if bpy.app.background:
            runtime.env_task.wait()
            ok = runtime.env_task.ok
            self.report({"INFO"} if ok else {"ERROR"}, runtime.env_task.status_text())
            return {"FINISHED"} if ok else {"CANCELLED"}
        start_task_polling()
        self.report({"INFO"}, f"Creating the backend environment; log: {log}")
        return {"FINISHED"}


class TRELLIS_OT_check_backend(bpy.types.Operator):
    """Run the backend self-test (Python, torch, GPU, kernels, weights) and show the result"""

    bl_idname = "trellis.check_backend"
    bl_label = "Check Backend"

    @classmethod
    def poll(cls, context):
        prefs = get_prefs(context)
        if not prefs.backend_python:
            cls.poll_message_set("Set the backend Python first")
            return False
        if runtime.selftest_task is not None and runtime.selftest_task.running:
            cls.poll_message_set("The self-test is running")
            return False
        return True

    def execute(self, context):
        prefs = get_prefs(context)
        python = bpy.path.abspath(prefs.backend_python)
        if not os.path.isfile(python):
            self.report({"WARNING"} if bpy.app.background else {"ERROR"}, f"Backend Python not found: {python}")
            runtime.selftest_lines = [f"! Backend Python not found: {python}"]
            return {"CANCELLED"}
        base = cache_dir(prefs) / "logs"
        args = []
        if prefs.model_dir:
            args += ["--model-dir", bpy.path.abspath(prefs.model_dir)]
        runtime.selftest_out = base / "selftest.json"
        runtime.selftest_lines = []
        runtime.selftest_task = tasks.selftest_task(python, runtime.extension_dir(), base / "selftest.log",
                                                    runtime.selftest_out, args).start()
        if bpy.app.background:
            runtime.selftest_task.wait(timeout=300)
            runtime.load_selftest_result()
            # the self-test exits 1 when it found problems; its JSON report is what counts here
            return {"FINISHED"} if runtime.selftest_data is not None else {"CANCELLED"}
        start_task_polling()
        return {"FINISHED"}


class TRELLIS_OT_download_models(bpy.types.Operator):
    """Download DINOv3 (gated: first, so a missing licence acceptance fails fast), the sparse-structure
    decoder, TRELLIS.2-4B and the BiRefNet background remover with the backend's Python"""

    bl_idname = "trellis.download_models"
    bl_label = "Download Models"

    which: EnumProperty(name="What", default="ALL", options={"SKIP_SAVE"}, items=(
        ("ALL", "All Models", "TRELLIS.2-4B, DINOv3, the sparse-structure decoder and BiRefNet"),
        ("REMBG", "Background Removal", "Only BiRefNet (ZhengPeng7/BiRefNet, MIT, ~440 MB)")))

    @classmethod
    def description(cls, context, properties):
        if properties.which == "REMBG":
            return "Download the BiRefNet background remover (ZhengPeng7/BiRefNet, MIT, ungated, ~440 MB)"
        return cls.__doc__

    @classmethod
    def poll(cls, context):
        if not getattr(bpy.app, "online_access", False):
            cls.poll_message_set("Blender's Online Access is off (Preferences › System › Network)")
            return False
        prefs = get_prefs(context)
        if not prefs.allow_downloads:
            cls.poll_message_set("Tick 'Allow model downloads' first")
            return False
        if not prefs.backend_python:
            cls.poll_message_set("Set the backend Python first")
            return False
        if runtime.download_task is not None and runtime.download_task.running:
            cls.poll_message_set("A download is running")
            return False
        return True

    def execute(self, context):
        prefs = get_prefs(context)
        if prefs.model_dir:
            root = os.path.dirname(os.path.normpath(bpy.path.abspath(prefs.model_dir)))
        else:
            root = str(cache_dir(prefs).parent / "models")
        everything = self.which == "ALL"
        runtime.download_task = tasks.download_task(bpy.path.abspath(prefs.backend_python), root,
                                                    cache_dir(prefs) / "logs" / "download.log",
                                                    models=everything).start()
        if everything:
            prefs.model_dir = os.path.join(root, "TRELLIS.2-4B")
            if not prefs.dinov3_dir:
                prefs.dinov3_dir = os.path.join(root, "dinov3-vitl16-pretrain-lvd1689m")
        if not prefs.rembg_dir:
            prefs.rembg_dir = os.path.join(root, tasks.REMBG_DOWNLOAD[1])
        if bpy.app.background:
            runtime.download_task.wait(timeout=6 * 3600)
            return {"FINISHED"} if runtime.download_task.ok else {"CANCELLED"}
        start_task_polling()
        return {"FINISHED"}


class TRELLIS_OT_open_path(bpy.types.Operator):
    """Open a file or folder with the system's default application"""

    bl_idname = "trellis.open_path"
    bl_label = "Open"

    path: StringProperty(name="Path", subtype="FILE_PATH", options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return True

    def execute(self, context):
        if not self.path or not os.path.exists(self.path):
            self.report({"ERROR"}, f"Not found: {self.path}")
            return {"CANCELLED"}
        if bpy.app.background:
            self.report({"INFO"}, self.path)
            return {"FINISHED"}
        if os.path.isdir(self.path):
            bpy.ops.wm.path_open(filepath=self.path)
        elif self.path.endswith((".log", ".txt", ".json")):
            text = bpy.data.texts.load(self.path)
            self.report({"INFO"}, f"Loaded into the Text Editor as {text.name!r}")
        else:
            bpy.ops.wm.path_open(filepath=self.path)
        return {"FINISHED"}


CLASSES = (TRELLIS_PG_preset, TRELLIS_AddonPreferences, TRELLIS_OT_create_backend_env, TRELLIS_OT_check_backend,
           TRELLIS_OT_download_models, TRELLIS_OT_open_path)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    if bpy.app.timers.is_registered(_task_timer):
        bpy.app.timers.unregister(_task_timer)
    for task in (runtime.env_task, runtime.selftest_task, runtime.download_task):
        if task is not None and task.running:
            task.cancel()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
