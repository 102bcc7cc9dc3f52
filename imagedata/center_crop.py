"""ADM center crop and the [-1, 1] tensor conversion used for every image dataset."""
import numpy as np
import torch
from PIL import Image


def center_crop_arr(pil_image, image_size):
    """ADM center crop (guided-diffusion / DiT): BOX-halve while min side >= 2*size, BICUBIC to size, crop.

    Returns a uint8 array (image_size, image_size, channels).
    """
    # Halving with BOX first keeps the final BICUBIC step from aliasing on large images.
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def to_model_range(arr):
    """uint8 (H, W) or (H, W, C) array -> float32 tensor (C, H, W) in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)  # (C, H, W)
    return x.float() / 127.5 - 1.0
