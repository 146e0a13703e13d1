"""The real meshes under ``../shared/assets/meshes`` by short name: one table for the O-Voxel benchmark
(``benchmarks/ovoxel.py``) and the asset tests (``tests/test_ovoxel_assets.py``)."""

ASSETS = {
    "spot": "spot/spot_triangulated.obj",
    "barrel": "barrel/barrel.glb",
    "water_bottle": "water_bottle/WaterBottle.gltf",
    "alpha_blend": "alpha_blend_mode_test/AlphaBlendModeTest.glb",
    "vase_flowers": "glass_vase_flowers/GlassVaseFlowers.glb",
    "sheen_cloth": "sheen_cloth/SheenCloth.gltf",
    "candle_holder": "glass_hurricane_candle_holder/GlassHurricaneCandleHolder.glb",
    "toy_car": "toy_car/ToyCar.gltf",
    "metal_rough_spheres": "metal_rough_spheres_no_textures/MetalRoughSpheresNoTextures.glb",
    "two_sided_plane": "two_sided_plane/TwoSidedPlane.gltf",
}
