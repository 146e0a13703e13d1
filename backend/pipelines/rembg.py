"""Model-based background removal with BiRefNet, exactly as TRELLIS.2's ``pipelines/rembg/BiRefNet.py``.

``mask = BiRefNetRemover(model)(rgb)``:

1. PIL ``BILINEAR`` squash of the RGB image to 1024² (no aspect kept);
2. ``/255`` then ImageNet normalisation (float32, torchvision's operation order);
3. ``sigmoid(model(x)[-1])``; ``(p * 255)`` **truncated** to ``uint8`` (``ToPILImage``);
4. resized back to the image size with PIL ``BICUBIC`` (Pillow's default for mode ``L``).

The official wrapper always runs on CUDA in fp32; here the model runs on the pipeline's device, fp32 on
CPU and fp16/bf16 on GPUs per the precision setting (the sigmoid and the mask are computed in fp32).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from ..errors import MissingWeights
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BiRefNetRemover", "REMBG_RESOLUTION", "remover_dtype", "check_rembg_folder", "load_rembg_model"]

REMBG_RESOLUTION = 1024


def remover_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU or with ``precision="fp32"``; bf16 when asked; fp16 otherwise (GPUs)."""
    if device.type == "cpu" or precision == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def check_rembg_folder(folder: str | os.PathLike) -> None:
    """Raise :class:`MissingWeights` (naming the preference and the download) if there is no weights file."""
    from ..models.birefnet import birefnet_weights_file

    st = birefnet_weights_file(folder)
    if not st.is_file():
        raise MissingWeights(
            f"Background-removal model not found: {st} does not exist.", missing=[str(st)],
            advice="Set the 'Background removal' folder in the add-on Preferences (or --rembg-model) to a download "
                   "of ZhengPeng7/BiRefNet (or briaai/RMBG-2.0) that holds model.safetensors, or press "
                   "'Download BiRefNet' there.")


def load_rembg_model(folder: str | os.PathLike, device: torch.device, precision: str = "auto") -> torch.nn.Module:
    """BiRefNet from ``folder`` on ``device`` in the dtype of :func:`remover_dtype` (strict load)."""
    from ..models.birefnet import load_birefnet

    check_rembg_folder(folder)
    return load_birefnet(folder, device=device, dtype=remover_dtype(precision, device))


class BiRefNetRemover:
    """Callable background remover: ``remover(rgb PIL image) -> PIL "L" mask`` of the same size."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 resolution: int = REMBG_RESOLUTION) -> None:
        self.model = model
        self.device = torch.device(device)
        self.resolution = resolution
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
                    precision: str = "auto") -> "BiRefNetRemover":
        """Load ``folder/model.safetensors`` (BiRefNet / RMBG-2.0 layout) strictly.

        Raises:
            MissingWeights: no weights file in the folder (the message names the preference).
            CheckpointError: a malformed file or a key/shape mismatch (listing the keys).
        """
        device = torch.device(device)
        return cls(load_rembg_model(folder, device, precision), device)

    def resized_rgb(self, image: Image.Image) -> np.ndarray:
        """Step 1: ``uint8 [R, R, 3]``."""
        r = self.resolution
        return np.asarray(image.convert("RGB").resize((r, r), Image.Resampling.BILINEAR))

    @staticmethod
    def model_input(resized: np.ndarray) -> torch.Tensor:
        """Step 2: ``float32 [1, 3, R, R]`` (ToTensor, then Normalize)."""
        x = torch.from_numpy(np.array(resized, copy=True)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
        return x.sub(mean).div(std).unsqueeze(0)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)[-1]`` as float32 on the CPU."""
        y = self.model(x.to(self.device, self.dtype))[-1]
        return y.float().cpu()

    @staticmethod
    def mask_from_logits(logits: torch.Tensor) -> np.ndarray:
        """Step 3: ``uint8 [R, R]`` = ``(sigmoid * 255)`` truncated."""
        return (logits.sigmoid()[0].squeeze() * 255).to(torch.uint8).numpy()

    @staticmethod
    def mask_to_size(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
        """Step 4: the ``R×R`` mask back at the photo's ``(width, height)``, PIL BICUBIC."""
        return Image.fromarray(mask, "L").resize(size, Image.Resampling.BICUBIC)

    def __call__(self, image: Image.Image) -> Image.Image:
        m = self.mask_from_logits(self.logits(self.model_input(self.resized_rgb(image))))
        return self.mask_to_size(m, image.size)
