"""Sampling in which image i depends only on (global seed, i): its label or caption, start noise and step noise.

Every sample draws from its own torch.Generator seeded from (global_seed, i), so the images do
not depend on how samples are split over processes or batches (official DiT seeds one generator
per rank instead, which ties the output to the world size). With the same batch composition the
result is bitwise identical; across batch sizes it is identical up to the float rounding of the
batched model forward.
"""
import argparse

import numpy as np
import torch

from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_pp_sample_loop
from diffusion.guidance import ClassifierFreeGuidance
from diffusion.respace import space_timesteps
from foundation.flag_types import check_at_least
from foundation.usage_error import UsageError
from models.label_dropout import CFG_DROP_PROB
from models.routing import NUM_TIMESTEPS, check_routing_covers
from models.vae import LATENT_SCALE, decode, load_vae
from sampling.checkpoint_flags import checkpoint_flags
from sampling.experts import check_lone_expert, load_experts
from sampling.model_from_checkpoint import load_checkpoint


# --sampler choices: ancestral DDPM (the paper's protocol), DDIM (eta = 0), DPM-Solver++(2M) (diffusion/dpm_solver.py)
SAMPLERS = ("ddpm", "ddim", "dpm-solver++")
# Classifier-free guidance scales of conditional models when --cfg-scale is not given:
FID_CFG_SCALE = 1.5   # the paper's FID setting (DDPM-250, cfg 1.5), sample_ddp.py and train.py's EMA grids
GRID_CFG_SCALE = 4.0  # official DiT's sample.py grid, sample.py

# Independent random streams of one sample.
LABEL_STREAM, NOISE_STREAM, CAPTION_STREAM = 0, 1, 2


def sample_generator(global_seed, index, stream):
    """A CPU generator for stream `stream` of sample `index`; SeedSequence decorrelates nearby seeds."""
    state = np.random.SeedSequence([global_seed, index, stream]).generate_state(2, dtype=np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])  # < 2**63: accepted by manual_seed
    return torch.Generator().manual_seed(seed)


def class_labels(indices, num_classes, global_seed, balanced):
    """Labels (N,) int64: uniform at random per sample (official DiT), or index % num_classes if balanced.

    balanced: with N not divisible by num_classes, classes 0 .. (N mod num_classes) - 1 get one more.
    """
    if balanced:
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    return torch.cat([torch.randint(num_classes, (1,), generator=sample_generator(global_seed, i, LABEL_STREAM))
                      for i in indices])


def validation_captions(indices, coco, global_seed):
    """One caption per sample, uniform over every (image, caption) pair of a COCO annotation file.

    Returns [{"index", "image_id", "caption"}] (the record sample_ddp.py writes beside the .npz). Pairs are
    ordered by image id, then annotation id, so the draw depends only on the file, the seed and i.
    """
    pairs = [(image_id, caption) for image_id in coco.image_ids for caption in coco.captions[image_id]]
    picks = []
    for i in indices:
        k = int(torch.randint(len(pairs), (1,), generator=sample_generator(global_seed, i, CAPTION_STREAM)))
        picks.append({"index": int(i), "image_id": pairs[k][0], "caption": pairs[k][1]})
    return picks


class PerSampleNoise:
    """Standard Gaussian noise whose row i is drawn from sample i's own generator, call after call.

    Each sample's generator lives on the CPU (the same values on any device) and draws the noise of
    CHUNK_CALLS calls at once, as one (CHUNK_CALLS, ...) tensor; the batch's draws are stacked and sent
    to the device in one copy (non-blocking from pinned memory on a GPU). So a sampling step reads a slice
    that is already on the device and never waits for the host, and sample i's noise still depends only on
    (global seed, i): the same for any batch split or world size, and after any resume (a resume restarts a
    sample from its first call). Call j of sample i is block j % CHUNK_CALLS of the (j // CHUNK_CALLS)-th
    draw of its generator. A counter-based scheme (noise = f(seed, i, j)) would avoid the chunk's memory
    (CHUNK_CALLS x the batch's noise on the device) but no torch generator is counter-based on the CPU.
    """

    CHUNK_CALLS = 64  # calls drawn per generator at once: DDPM-250 needs 251 (x_T and one per step), 4 copies

    def __init__(self, indices, global_seed, device="cpu"):
        self.generators = [sample_generator(global_seed, i, NOISE_STREAM) for i in indices]
        self.device = torch.device(device)
        self.chunk, self.position, self.shape = None, 0, None

    def __call__(self, shape):
        """Noise of `shape` = (N, ...), row i from generator i, on the device."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise batch {shape[0]} != {len(self.generators)} samples")
        if self.shape is not None and tuple(shape) != self.shape:
            raise ValueError(f"noise shape {tuple(shape)} differs from the earlier calls' {self.shape}")
        self.shape = tuple(shape)
        if self.chunk is None or self.position == self.CHUNK_CALLS:
            self.chunk, self.position = self._draw_chunk(tuple(shape[1:])), 0
        noise = self.chunk[:, self.position]  # (N, ...), a strided view: no copy
        self.position += 1
        return noise

    def _draw_chunk(self, sample_shape):
        """(N, CHUNK_CALLS, ...) noise on the device: each generator's next CHUNK_CALLS draws."""
        # pinned host memory lets the copy to a GPU run without blocking the host
        draws = torch.empty((len(self.generators), self.CHUNK_CALLS, *sample_shape),
                            pin_memory=self.device.type == "cuda")
        for i, g in enumerate(self.generators):
            torch.randn((self.CHUNK_CALLS, *sample_shape), generator=g, out=draws[i])  # in place: no stack copy
        return draws.to(self.device, non_blocking=True)

def check_sampling_flags(args):
    """UsageError for sampling flags that cannot work, before the checkpoint is read (sample.py, sample_ddp.py)."""
    check_at_least(args, 1, "num_sampling_steps")
    try:  # official DiT's respacing rules: e.g. DDIM needs an integer stride < T, so ddim1 is refused
        space_timesteps(NUM_TIMESTEPS, timestep_respacing(args.sampler, args.num_sampling_steps))
    except ValueError as error:
        raise UsageError(f"--sampler {args.sampler} --num-sampling-steps {args.num_sampling_steps}: {error}") from None
    if args.cfg_scale is not None and args.cfg_scale < 0:
        # eps_u + s (eps_c - eps_u) with s < 0 steers away from the class: not classifier-free guidance
        raise UsageError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), "
                         f"got {args.cfg_scale}")


def timestep_respacing(sampler, num_sampling_steps):
    """create_diffusion's timestep_respacing for a sampler and step count: "ddimN" (DDIM's even stride),
    "trailingN" (DPM-Solver++: uniform steps down from t = T - 1) or "N" (DDPM)."""
    return {"ddim": f"ddim{num_sampling_steps}", "dpm-solver++": f"trailing{num_sampling_steps}"}.get(
        sampler, str(num_sampling_steps))


def resolve_cfg_scale(cfg_scale, num_classes, default, class_dropout_prob=CFG_DROP_PROB):
    """CFG scale to use: `default` for conditional models, 1 (no guidance) for unconditional ones and for
    conditional ones without a null class (guided-diffusion's released ADM, trained without label dropout)."""
    if num_classes == 1 or class_dropout_prob == 0:
        if cfg_scale is not None and cfg_scale != 1.0:
            why = ("the model is unconditional (num_classes = 1)" if num_classes == 1 else
                   "the model has no null class (trained with class_dropout_prob = 0)")
            raise UsageError(f"--cfg-scale {cfg_scale} given, but {why}: classifier-free guidance does not apply")
        return 1.0
    return default if cfg_scale is None else cfg_scale


def model_function(model, cfg_scale, guide_channels, mixed_precision, compile=False, compile_backend="inductor"):
    """The callable the sampler runs: the model (under bf16 autocast if asked), guided if cfg_scale != 1.

    compile: torch.compile the whole call, the doubled CFG batch and the guidance combination included
    (sample_ddp.py --compile); build it once and pass it to every generate() so it compiles once.
    """
    device_type = next(model.parameters()).device.type

    def model_fn(x, t, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            return model(x, t, **kwargs).float()  # the diffusion math stays in fp32

    # guidance at scale 1 is the conditional model: skip the doubled batch; else the wrapper doubles it
    fn = model_fn if cfg_scale == 1.0 else ClassifierFreeGuidance(model_fn, cfg_scale, null_condition(model),
                                                                  guide_channels)
    if not compile:
        return fn
    return torch.compile(fn if cfg_scale == 1.0 else fn.__call__, dynamic=False, backend=compile_backend)


def null_condition(model):
    """Unconditional model kwargs for CFG: a text model's learned null caption, else the null class (official DiT)."""
    if hasattr(model, "null_context"):
        return model.null_condition(with_mask=True)  # the conditional kwargs always carry a context_mask
    device = next(model.parameters()).device  # made on the model's device once, not copied at every step
    return {"y": torch.full((), model.num_classes, dtype=torch.long, device=device)}  # null class = num_classes


@torch.no_grad()
def generate(model, diffusion, sampler, indices, condition, global_seed, cfg_scale=1.0, guide_channels="all",
             mixed_precision="no", progress=False, clip_denoised=False, model_fn=None):
    """Samples (N, C, H, W) in model space for global sample indices and their condition (DDPM, DDIM eta=0 or
    DPM-Solver++(2M); the last two are deterministic given x_T).

    condition: class labels (N,), or the model kwargs of a text model ({"context", "context_mask"}).
    clip_denoised clips the predicted x_0 to [-1, 1]: right for pixel models, wrong for VAE latents.
    model_fn: model_function(model, cfg_scale, guide_channels, mixed_precision, ...) built once by the caller
    (sample_ddp.py --compile); by default built here.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    device = next(model.parameters()).device
    if model_fn is None:
        model_fn = model_function(model, cfg_scale, guide_channels, mixed_precision)
    noise = PerSampleNoise(indices, global_seed, device)
    shape = (len(indices), model.in_channels, model.input_size, model.input_size)
    loop = {"ddim": diffusion.ddim_sample_loop, "ddpm": diffusion.p_sample_loop}.get(sampler)
    # x_T and every step's noise come from each sample's own generator (DDIM with eta = 0 uses none)
    model_kwargs = condition if isinstance(condition, dict) else {"y": condition}
    model_kwargs = {key: value.to(device) for key, value in model_kwargs.items()}
    if loop is None:  # DPM-Solver++ draws no step noise
        return dpm_solver_pp_sample_loop(diffusion, model_fn, shape, noise=noise(shape), clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs, device=device, progress=progress)
    return loop(model_fn, shape, noise=noise(shape), clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                device=device, progress=progress, noise_fn=lambda x: noise(x.shape))


def load_for_sampling(args, device, default_cfg_scale):
    """(model, settings, cfg_scale, diffusion, vae) from a sampling script's --ckpt, --sampler and step flags."""
    paths = [args.ckpt] if isinstance(args.ckpt, str) else list(args.ckpt)
    expert_ranges = getattr(args, "expert_range", None)
    if len(paths) > 1 or expert_ranges is not None:  # multi-experts (Table 6)
        model, settings = load_experts(paths, expert_ranges, checkpoint_flags(args), args.use_model_weights)
    else:
        model, settings = load_checkpoint(paths[0], checkpoint_flags(args), args.use_model_weights)
        check_lone_expert(settings, paths[0], getattr(args, "allow_partial_expert", False))
    model = model.to(device)
    # a text model is conditional (no num_classes); its null condition is the learned null caption
    dropout = model.config.get("class_dropout_prob", model.config.get("caption_dropout_prob", CFG_DROP_PROB))
    cfg_scale = resolve_cfg_scale(args.cfg_scale, getattr(model, "num_classes", None), default=default_cfg_scale,
                                  class_dropout_prob=dropout)
    respacing = timestep_respacing(args.sampler, args.num_sampling_steps)
    diffusion = create_diffusion(**{**settings.diffusion_config, "timestep_respacing": respacing})
    try:
        check_routing_covers(model, diffusion.original_num_steps)
    except ValueError as error:
        raise UsageError(f"{' '.join(paths)}: {error}") from None
    vae = None if settings.vae == "none" else load_vae(settings.vae, device)
    return model, settings, cfg_scale, diffusion, vae


def load_text_conditioning(settings, model, device, captions_path=None):
    """The frozen CLIP encoder a text model was trained with (checkpoint's text_encoder, or --text-encoder)."""
    from imagedata.caption_conditioning import CaptionConditioning  # transformers only for text models
    try:
        conditioning = CaptionConditioning.load(settings.text_encoder, captions_path, max_length=model.max_text_len,
                                                device=device)
    except (OSError, ValueError) as error:  # encoder not found offline, captions file missing or corrupt
        raise UsageError(str(error)) from None
    if conditioning.encoder.width != model.context_dim:
        raise UsageError(f"text encoder {settings.text_encoder!r} gives {conditioning.encoder.width}-wide tokens but "
                         f"the model was trained on {model.context_dim}-wide ones (another --text-encoder?)")
    return conditioning


def parse_guide_channels(value):
    """--guide-channels: 'all' latent channels, or how many (3 = official DiT's legacy guidance)."""
    if value == "all":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a number of channels >= 1, got {value!r}")
    return int(value)


@torch.no_grad()
def to_uint8(samples, vae=None, latent_scale=LATENT_SCALE):
    """Model-space samples (N, C, H, W) -> uint8 images (N, H', W', C'): VAE-decoded if latent, as in DiT."""
    if vae is not None:
        samples = decode(vae, samples, latent_scale)  # (N, 3, 8H, 8W)
    images = torch.clamp(127.5 * samples + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)

