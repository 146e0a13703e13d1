"""Add-on preferences: backend Python and environment, model folders, device and cache options.

Operators here: create the backend environment (venv + pip, non-blocking, logged), check the backend
(``trellis2 selftest`` JSON shown in the preferences), open the setup log. Model downloads:
``ops_download``; the preferences accessors and the task timer: ``prefs_access``.
"""

from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, IntProperty, StringProperty

from . import env_setup, model_folders, runtime, tasks
from .ops_download import draw_download_box
from .prefs_access import (ADDON, backend_task_ready, cache_dir, get_prefs, start_task_polling,  # noqa: F401
                           stop_task_polling)
from .setup_check import TRELLIS_PG_preset, draw_presets_box, folder_update  # issue 16: presets, folders

PRECISIONS = (
    ("AUTO", "Auto", "bf16 (official) on NVIDIA RTX 30xx / A100 or newer (compute capability 8.0+), "
                     "fp16 on older NVIDIA GPUs (GTX 10xx / RTX 20xx have no bf16), fp32 on the CPU"),
    ("BF16", "bf16", "bfloat16: what the model was trained in; needs an RTX 30xx / A100 or newer"),
    ("FP16", "fp16", "float16: for older GPUs; may overflow (NaN/Inf) in some images"),
    ("FP32", "fp32", "float32: never overflows, but needs about 2× the VRAM of the flow models and is slower"),
)
MAX_TOKENS_DEFAULT = 49152  # the official cascade token budget


def _is_loopback(host: str) -> bool:
    from .backend.transport import is_loopback

    return is_loopback(host.strip())


def default_env_dir() -> str:
    try:
        return bpy.utils.extension_path_user(ADDON, path="backend_env", create=False)
    except (ValueError, AttributeError, TypeError):
        return ""


class TRELLIS_AddonPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON

    backend_python: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python interpreter of the backend environment (with torch); the add-on never imports torch")
    env_dir: StringProperty(
        name="Environment folder", subtype="DIR_PATH",
        description="Where 'Create backend environment' makes the venv (empty: the extension's user folder)")
    torch_build: EnumProperty(
        name="Torch build", default="AUTO", items=env_setup.TORCH_BUILDS,
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
        col.label(text=env_setup.torch_build_hint(self.torch_build), icon="INFO")
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
            icon, text = model_folders.model_folder_status(bpy.path.abspath(getattr(self, prop)), kind)
            col.label(text=text, icon=icon)
        draw_download_box(box, self)

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
            task = env_setup.create_env_task(env_dir, ext_dir, log, build=prefs.torch_build,
                                         custom_url=prefs.torch_index_url)
        except (FileNotFoundError, ValueError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        try:
            runtime.env_task = task.start()
        except OSError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        prefs.backend_python = str(env_setup.venv_python(env_dir))
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
        return backend_task_ready(cls, context, runtime.selftest_task, "The self-test is running")

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
           TRELLIS_OT_open_path)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    stop_task_polling()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
