"""Respacing: a diffusion on a subset of timesteps with the same alpha_bar there (improved DDPM Sec. 4; DDIM Sec. 4.2)."""

import numpy as np
from .gaussian_diffusion import GaussianDiffusion


def _parse_count(text, spec):
    """A positive step count from one field of a respacing string."""
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"malformed timestep_respacing {spec!r}: {text!r} is not an integer") from None
    if count < 1:
        raise ValueError(f"timestep_respacing {spec!r} asks for {count} steps; counts must be >= 1")
    return count


def space_timesteps(num_timesteps, section_counts):
    """Set of original timesteps to keep.

    section_counts: "ddimN" (N steps strided evenly from t = 0 with an integer stride < T, DDIM's uniform
    spacing; official DiT raises for N with no such stride, "ddim1" included), "trailingN" (N steps
    round(T - i T / N) - 1, evenly spaced down from T - 1: Lin et al. 2024's "trailing"), an int,
    a list of ints, or a comma string "10,15,20": the T steps are split into equal sections and
    section i keeps count_i steps evenly spaced from its first to its last timestep (a running
    sum of the fractional stride, rounded half to even), the same set as improved DDPM / ADM /
    official DiT for every count. So "250" with T = 1000 keeps 0, 4, 8, ..., 999.
    """
    spec = section_counts
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("trailing"):
            desired = _parse_count(text[len("trailing"):], spec)
            if desired > num_timesteps:
                raise ValueError(f"timestep_respacing {spec!r} asks for {desired} steps but the diffusion "
                                 f"has only {num_timesteps}")
            # consecutive values differ by T / N >= 1 before rounding, so the N timesteps are distinct
            return {round(num_timesteps - i * num_timesteps / desired) - 1 for i in range(desired)}
        if text.startswith("ddim"):
            desired = _parse_count(text[len("ddim"):], spec)
            if desired > num_timesteps:
                raise ValueError(f"timestep_respacing {spec!r} asks for {desired} steps but the diffusion "
                                 f"has only {num_timesteps}")
            # strides 1 .. T - 1, as official DiT / ADM: a stride of T (one step, at t = 0) is refused there
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"timestep_respacing {spec!r}: no integer stride gives exactly {desired} steps "
                             f"out of {num_timesteps}")
        section_counts = [_parse_count(part, spec) for part in text.split(",")]
    elif isinstance(section_counts, int) and not isinstance(section_counts, bool):
        section_counts = [_parse_count(section_counts, spec)]
    else:
        section_counts = [_parse_count(c, spec) for c in section_counts]
    if not section_counts:
        raise ValueError(f"malformed timestep_respacing {spec!r}: no step counts")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"timestep_respacing {spec!r} asks for {count} steps from a section of {size} "
                             f"timesteps (diffusion has {num_timesteps})")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # accumulate the fractional stride as official DiT / ADM do: round(j * stride) differs from the
        # running sum in float64 for 278 of the 1000 counts at T = 1000 (e.g. "21" keeps 499, not 500)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """GaussianDiffusion on the kept timesteps; the model is always called with original-scale t."""

    SCHEDULE_TABLES = GaussianDiffusion.SCHEDULE_TABLES + ("timestep_map_array",)

    def __init__(self, use_timesteps, **kwargs):
        base_betas = np.asarray(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(base_betas)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {self.original_num_steps})")
        # beta'_i = 1 - alpha_bar(s_i) / alpha_bar(s_{i-1}) keeps alpha_bar identical at the kept steps
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        self.timestep_map = sorted(self.use_timesteps)
        kept = base_alphas_cumprod[self.timestep_map]
        kwargs["betas"] = 1.0 - kept / np.append(1.0, kept[:-1])
        super().__init__(**kwargs)
        self.timestep_map_array = np.asarray(self.timestep_map, dtype=np.int64)

    def _model_timesteps(self, t):
        # respaced index i -> original timestep s_i, so timestep embeddings and DTR masks see 0..T-1;
        # the map lives on t's device once, with the schedule tables
        return self._table("timestep_map_array", t.device)[t]
