"""A learnable rotation of input images (EvoGrad, Sec. 4.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import InputTransform


def rotate_images(images: torch.Tensor, radians: torch.Tensor | float, padding_mode: str = "zeros") -> torch.Tensor:
    """Rotates images `[B, C, H, W]` counter-clockwise (as displayed, row 0 on top) by `radians` about their centre.

    Bilinear sampling with `affine_grid`/`grid_sample`, differentiable w.r.t. the angle. Pixels from outside the image
    are 0 (`"zeros"`), the nearest edge pixel (`"border"`) or mirrored (`"reflection"`).
    """
    angle = torch.as_tensor(radians, dtype=images.dtype, device=images.device)
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    # affine_grid maps output coordinates to input coordinates (x right, y down): sampling the output pixel at (x, y)
    # from (x cos - y sin, x sin + y cos) turns the image counter-clockwise as displayed. Those are pixel distances;
    # affine_grid's coordinates run from -1 to 1 across the width and the height, so a non-square image needs the
    # aspect ratio in the off-diagonal terms to turn rigidly
    aspect = images.shape[-2] / images.shape[-1]  # H / W
    matrix = torch.stack([torch.stack([cos, -sin * aspect, zero]), torch.stack([sin / aspect, cos, zero])])
    grid = F.affine_grid(matrix.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


class LearnableRotation(InputTransform):
    """Rotates training images by a learned angle, the meta-parameter of EvoGrad's rotation experiment (Bohdal et
    al., NeurIPS 2021, Sec. 4.2): when validation images are rotated with respect to training images, the angle that
    minimises the validation loss of the model trained on rotated training images is the hidden rotation.

    The angle is stored in radians (`angle`); [`~LearnableRotation.degrees`] reads it in degrees.

    Args:
        degrees (`float`, *optional*, defaults to 0.0):
            Initial angle.
        padding_mode (`str`, *optional*, defaults to `"zeros"`):
            How pixels from outside the image are filled (see [`rotate_images`]).
        input_name (`str`, *optional*, defaults to `"pixel_values"`):
            The batch key of the images.
    """

    def __init__(self, degrees: float = 0.0, padding_mode: str = "zeros", input_name: str = "pixel_values"):
        super().__init__(input_name)
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(
                f"Unknown padding_mode={padding_mode!r}: choose one of ('zeros', 'border', 'reflection')."
            )
        self.padding_mode = padding_mode
        self.angle = nn.Parameter(torch.tensor(math.radians(degrees)))

    @property
    def degrees(self) -> float:
        return math.degrees(self.angle.item())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Rotates `[B, C, H, W]` images by the learned angle."""
        return rotate_images(images, self.angle.to(images.dtype), self.padding_mode)

    def extra_repr(self) -> str:
        return f"degrees={self.degrees:.2f}, padding_mode={self.padding_mode!r}"
