"""The dihedral group D4: the 8 rotations and flips under which a sky cutout is the same object."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)
D4_ELEMENTS = 8


def d4_transform(x: ArrayOrTensor, k: int) -> ArrayOrTensor:
    """Element ``k`` (0..7) of D4 on the last two axes: a left-right flip if ``k >= 4``, then ``k % 4``
    quarter turns. Works on numpy arrays and torch tensors of any leading shape. A sky cutout has no
    preferred orientation or handedness, so all eight are equally valid images of the object.
    """
    if not 0 <= k < 8:
        raise ValueError(f"D4 has elements 0..7, got {k}")
    if isinstance(x, torch.Tensor):
        y = torch.flip(x, dims=(-1,)) if k >= 4 else x
        return torch.rot90(y, k % 4, dims=(-2, -1))
    y = np.flip(x, axis=-1) if k >= 4 else x
    return np.rot90(y, k % 4, axes=(-2, -1))
