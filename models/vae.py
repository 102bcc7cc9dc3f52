"""The Stable Diffusion VAE of latent DiTs (SPEC Sec. 5): names, scale, loading, encoding with flips, decoding.

Latent models see VAE latents times LATENT_SCALE (256x256x3 -> 32x32x4); pixel-space models (ADM, the
tiny DiTs) use no VAE, written "none" in flags and checkpoints. diffusers is imported only when a VAE
is actually loaded, so pixel-space training and sampling do not need it.
"""
import torch

from launch.cli import UsageError

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
    try:
        return AutoencoderKL.from_pretrained(vae_name(name_or_path)).to(device).eval()
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load the VAE {name_or_path!r} (offline? pass --vae with a local path "
                         f"holding a diffusers AutoencoderKL): {first_line}") from None


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
