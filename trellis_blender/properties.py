"""Property groups: per-file generation settings on the Scene, transient job state on the WindowManager.

``Scene.trellis2`` (saved with the .blend): input image, pipeline, seed, per-stage steps/guidance and
output options. ``WindowManager.trellis2`` (never saved): backend state, running job progress, last
error and the job history list (rebuilt from the cache folder).
"""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty,
                       PointerProperty, StringProperty)

from .backend.contract import DEFAULT_SEED

PIPELINES = (
    ("512", "512", "Fast preview (512³ sparse structure)"),
    ("1024", "1024", "1024 direct"),
    ("1024_cascade", "1024 Cascade", "512 then 1024 (recommended)"),
    ("1536_cascade", "1536 Cascade", "512 then 1536: most detail, most memory"),
)
MATERIAL_MODES = (
    ("TEXTURES", "Baked Textures", "Base colour and metallic/roughness images on a UV map (exportable)"),
    ("VERTEX", "Vertex Attributes", "Fast preview: PBR values stored per vertex"),
)
BACKGROUND_MODES = (
    ("AUTO", "Auto", "Use the image's transparency if it has any; otherwise cut the object out with the "
                     "background-removal model (or, without one, a plain-colour background keyer)"),
    ("REMOVE", "Remove", "Always cut the object out with the background-removal model (ignores the alpha channel)"),
    ("KEEP", "Keep", "Use the image as it is: no background removal"),
)
TEXTURE_RESOLUTIONS = (
    ("512", "512", "Coarse voxels, 512 texture model (fastest)"),
    ("1024", "1024", "Official default"),
    ("1536", "1536", "Finest voxels (most memory)"),
)
TEXTURE_SLOT_MODES = (
    ("PER_SLOT", "Per Slot", "Each material slot the faces use gets its own new material (sharing the baked "
                             "images): the mesh keeps its parts"),
    ("ONE", "One Material", "All faces get one new material"),
)
TEXTURE_SIZES = tuple((str(s), f"{s} px", f"{s}×{s} textures") for s in (512, 1024, 2048, 4096))


class TRELLIS_PG_view(bpy.types.PropertyGroup):
    """One extra view of the object (multi-view generation)."""

    image: PointerProperty(name="Image", type=bpy.types.Image, description="Another view of the same object")


class TRELLIS_PG_settings(bpy.types.PropertyGroup):
    image: PointerProperty(name="Image", type=bpy.types.Image, description="Input image (a Blender image)")
    background: EnumProperty(
        name="Background", default="AUTO", items=BACKGROUND_MODES,
        description="How the object is cut out of the image before generation")
    texture_resolution: EnumProperty(
        name="Voxel Resolution", default="1024", items=TEXTURE_RESOLUTIONS,
        description="O-Voxel grid the selected meshes are voxelised at for Texture Selected")
    texture_slots: EnumProperty(
        name="Materials", default="PER_SLOT", items=TEXTURE_SLOT_MODES,
        description="How Texture Selected assigns the new material to the faces")
    cutout_image: PointerProperty(name="Cut-out", type=bpy.types.Image,
                                  description="The image the model sees (after background removal and crop)")
    cutout_info: StringProperty(name="Cut-out Info")
    cutout_note: StringProperty(name="Cut-out Note")
    pipeline: EnumProperty(name="Pipeline", items=PIPELINES, default="1024_cascade")
    seed: IntProperty(name="Seed", default=DEFAULT_SEED, min=0, max=2**31 - 1)
    randomize_seed: BoolProperty(name="Randomize", default=False, description="A new random seed for each run")
    ss_steps: IntProperty(name="Steps", default=12, min=1, max=100, description="Sparse-structure sampler steps")
    ss_guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=20.0, description="Sparse-structure CFG")
    shape_steps: IntProperty(name="Steps", default=12, min=1, max=100, description="Shape sampler steps")
    shape_guidance: FloatProperty(name="Guidance", default=7.5, min=0.0, max=20.0, description="Shape CFG")
    tex_steps: IntProperty(name="Steps", default=12, min=1, max=100, description="Texture sampler steps")
    tex_guidance: FloatProperty(name="Guidance", default=1.0, min=0.0, max=20.0, description="Texture CFG")
    material_mode: EnumProperty(name="Material", items=MATERIAL_MODES, default="TEXTURES")
    decimation_target: IntProperty(name="Max Faces", default=500_000, min=1_000, max=20_000_000,
                                   description="Decimate the generated mesh to at most this many faces")
    texture_size: EnumProperty(name="Texture Size", items=TEXTURE_SIZES, default="2048")
    views: CollectionProperty(type=TRELLIS_PG_view, name="Extra Views",
                              description="More images of the same object (side, back…) that condition the generation too")
    views_index: IntProperty(name="Active View", default=0)
    multiview: EnumProperty(name="Combine Views", default="STOCHASTIC", items=(
        ("STOCHASTIC", "Stochastic", "Each sampler step looks at one view, cycling through them (fast)"),
        ("MULTIDIFFUSION", "Multidiffusion", "Every step averages all views (slower: one pass per view)")))
    use_blockout: BoolProperty(
        name="Use Selected Mesh as Blockout", default=False,
        description="The active mesh decides the rough shape (proportions, silhouette); the image adds detail and "
                    "materials. The result is placed on the blockout")
    blockout_strength: FloatProperty(
        name="Strength", default=1.0, min=0.05, max=1.0, subtype="FACTOR",
        description="1: the blockout is the structure exactly; lower: the model may depart from it (needs the "
                    "TRELLIS v1 sparse-structure encoder)")
    blockout_placement: EnumProperty(name="Result", default="REPLACE", items=(
        ("REPLACE", "Replace", "Put the result where the blockout is and hide the blockout (it is kept)"),
        ("BESIDE", "Beside", "Put the result next to the blockout")))


class TRELLIS_PG_history_item(bpy.types.PropertyGroup):
    # ``name`` (from PropertyGroup) holds the job id.
    title: StringProperty(name="Title", description="The input image's name")
    error: StringProperty(name="Error", description="Why the job failed")
    kind: StringProperty(name="Kind")
    pipeline: StringProperty(name="Pipeline")
    seed: IntProperty(name="Seed")
    duration: FloatProperty(name="Duration", subtype="TIME_ABSOLUTE", unit="TIME_ABSOLUTE")
    folder: StringProperty(name="Folder", subtype="DIR_PATH")
    image_path: StringProperty(name="Image", subtype="FILE_PATH")
    thumbnail: StringProperty(name="Thumbnail", subtype="FILE_PATH")
    status: StringProperty(name="Status")
    created: StringProperty(name="Created")


class TRELLIS_PG_state(bpy.types.PropertyGroup):
    backend_state: EnumProperty(
        name="Backend", default="STOPPED",
        items=(("STOPPED", "Not Started", ""), ("STARTING", "Starting", ""), ("READY", "Ready", ""),
               ("BUSY", "Busy", ""), ("CRASHED", "Stopped", "")))
    backend_info: StringProperty(name="Backend Info")
    running: BoolProperty(name="Running")
    job_id: StringProperty(name="Job")
    job_kind: StringProperty(name="Job Kind")
    stage: StringProperty(name="Stage")
    step: IntProperty(name="Step")
    total: IntProperty(name="Total")
    eta: FloatProperty(name="ETA")
    progress: FloatProperty(name="Progress", min=0.0, max=1.0, subtype="FACTOR",
                            description="The whole job (learned stage durations), else the current stage")
    stage_progress: FloatProperty(name="Stage Progress", min=0.0, max=1.0, subtype="FACTOR")
    job_eta: FloatProperty(name="Job ETA", default=-1.0, description="Seconds left in the whole job (-1: unknown)")
    result_note: StringProperty(name="Result Note", description="What to know about the last result")
    error: StringProperty(name="Error")
    error_hint: StringProperty(name="Hint")
    error_kind: StringProperty(name="Error Kind", description="The backend's error kind (oom, numerical, …)")
    error_job: StringProperty(name="Failed Job", description="The job the error belongs to")
    log_path: StringProperty(name="Log", subtype="FILE_PATH")
    last_duration: FloatProperty(name="Last Duration")
    history: CollectionProperty(type=TRELLIS_PG_history_item)
    history_index: IntProperty(name="Selected Job", default=0)
    show_history: BoolProperty(name="History", default=False)


CLASSES = (TRELLIS_PG_view, TRELLIS_PG_settings, TRELLIS_PG_history_item, TRELLIS_PG_state)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.trellis2 = PointerProperty(type=TRELLIS_PG_settings)
    bpy.types.WindowManager.trellis2 = PointerProperty(type=TRELLIS_PG_state)


def unregister() -> None:
    del bpy.types.WindowManager.trellis2
    del bpy.types.Scene.trellis2
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
