"""GPU kernels (Triton) for the hot sparse operations, each behind the same function as its
pure-PyTorch reference; the registry picks the kernel or the reference per device.

Public ops (tensors in, tensors out, any device):

* :func:`submanifold_conv3d` / :func:`submanifold_conv3d_rows`: submanifold 3×3×3 sparse conv over a
  cached neighbour map (implicit GEMM, fp32 accumulation);
* :func:`extract_mesh`: O-Voxel → mesh (the codec's ``decode_mesh`` faces);
* :func:`sample_attributes` / :class:`AttributeSampler`: sparse trilinear attribute sampling.

Selection: ``TRELLIS_KERNELS=auto|reference|triton`` (see :mod:`kernels.registry`). ``import kernels``
never imports Triton; the Triton modules (``kernels.triton_*``) are imported on first use.

Checks without a GPU: :mod:`kernels.testing` loads a kernel module under the CPU interpreter
(``TRITON_INTERPRET=1``) for parity tests; ``python -m kernels.aot_check --arch 80 90`` compiles every
kernel to NVIDIA cubins with Triton's bundled ``ptxas``.
"""

from . import registry
from .attr_sample import AttributeSampler, sample_attributes
from .mesh_extract import extract_mesh
from .sparse_conv import submanifold_conv3d, submanifold_conv3d_rows

__all__ = [
    "AttributeSampler",
    "extract_mesh",
    "registry",
    "sample_attributes",
    "submanifold_conv3d",
    "submanifold_conv3d_rows",
]
