"""TRELLIS.2 generation backend (PyTorch re-implementation).

Importing this package must stay cheap and torch-free: the Blender add-on imports the numpy-only
subpackages (``backend.protocol``, ``backend.ovoxel``) from the bundled copy of this package.
All imports inside ``backend`` are relative so it works both as the top-level package ``backend``
(the backend process, the CLI, the tests) and as ``<extension>.backend`` inside Blender.
"""

__version__ = "0.1.0"
