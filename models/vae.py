"""The Stable Diffusion VAE of latent DiTs (App. C): names, scale, loading, encoding with flips, decoding.

Latent models see VAE latents times LATENT_SCALE (256x256x3 -> 32x32x4); pixel-space models (ADM, the
tiny DiTs) use no VAE, written "none" in flags and checkpoints. diffusers is imported only when a VAE
is actually loaded, so pixel-space training and sampling do not need it.
"""
import os
import warnings

import torch

from foundation.usage_error import UsageError

LATENT_SCALE = 0.18215       # SD VAE latent scale (LDM / official DiT: encode * 0.18215, decode(z / 0.18215))
LATENT_DOWNSAMPLE = 8        # SD VAE: 256x256x3 -> 32x32x4
VAE_SHORTHANDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # official DiT --vae
NO_VAE = "none"              # pixel-space models


def vae_name(name):
    """Official DiT's --vae shorthand ema | mse -> the Hub name; a Hub name, local path or "none" as given."""
    return VAE_SHORTHANDS.get(name, name)


def load_vae(name_or_path, device):
    """The diffusers AutoencoderKL of a latent model (a shorthand, Hub name or local folder), in eval mode."""
    from diffusers.models import AutoencoderKL  # imported here: pixel-space models need no diffusers
    from diffusers.utils import is_accelerate_available
    path = vae_name(name_or_path)
    try:
        with warnings.catch_warnings():  # diffusers passes hf_hub_download an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            # Low-memory loading needs accelerate; without it diffusers would print a paragraph recommending it
            # (also before an error, which must stay one line), so ask for it only where it is installed.
            return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=is_accelerate_available()).to(device).eval()
    except OSError:  # diffusers: a folder without the model files, or weights neither cached nor downloadable
        if os.path.isdir(path):
            why = f"the folder {path} does not hold a diffusers AutoencoderKL (config.json and weights)"
        elif os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"):
            why = (f"the VAE weights {path} are not available offline (HF_HUB_OFFLINE is set and they are not "
                   f"in the Hugging Face cache)")
        else:
            why = f"the VAE weights {path} are neither in the Hugging Face cache nor downloadable (no network?)"
        raise UsageError(f"{why}; pass --vae with a local folder holding a diffusers AutoencoderKL "
                         f"(AutoencoderKL.save_pretrained writes one)") from None


@torch.no_grad()
def encode_with_flip(vae, x, scale=LATENT_SCALE):
    """x (B, 3, H, W) in [-1, 1] -> scaled posterior (means, stds), each (B, 2, C, h, w): [:, 0] image, [:, 1] hflip."""
    both = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W)
    posterior = vae.encode(both).latent_dist
    # q(z|x) = N(mean, std^2); scaling z by `scale` scales both moments
    mean, std = posterior.mean * scale, posterior.std * scale  # (2B, C, h, w) each
    return torch.stack(mean.chunk(2), dim=1), torch.stack(std.chunk(2), dim=1)  # (B, 2, C, h, w) each


@torch.no_grad()
def decode(vae, z, scale=LATENT_SCALE):
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W), float32, nominally in [-1, 1]."""
    return vae.decode(z.to(vae.dtype) / scale).sample.float()
