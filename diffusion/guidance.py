"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6) as a wrapper around any conditional model.

    guided = ClassifierFreeGuidance(model, guidance_scale=1.5,
                                    uncond_kwargs={"y": torch.full((n,), model.num_classes)})
    samples = diffusion.p_sample_loop(guided, (n, C, H, W), model_kwargs={"y": y}, device=device)

The wrapper is itself a model(x_t, t, **model_kwargs): the sampler sees an un-doubled batch of n,
and each call runs `model` once on a doubled batch of 2n (conditional half first, then the
unconditional half built from `uncond_kwargs`). Output = uncond + s * (cond - uncond) on the
guided channels; every other channel comes from the conditional branch.

guide_channels:
  "all" (default): the first C output channels, C = x_t.shape[1], i.e. the whole eps / x0 / v
      prediction. With learn_sigma the model returns [prediction (C), var_values (C)] and the
      variance channels are taken from the conditional branch.
  an int k: guide only out[:, :k]. k = 3 reproduces official DiT, which guides only 3 of the
      4 latent eps channels "for exact reproducibility" of its released numbers.
"""

import torch


def merge_cond_uncond_kwargs(model_kwargs, uncond_kwargs, batch_size):
    """Doubled-batch kwargs: per-sample tensors become cat([cond, uncond]); other values pass unchanged.

    A per-sample tensor is one whose first dimension is batch_size. Its unconditional half is
    uncond_kwargs[key] (a full (batch_size, ...) tensor, a (1, ...) tensor or a tensor without the
    batch dimension, both broadcast to the batch) or, if the key is absent there, the conditional value.
    """
    unknown = set(uncond_kwargs) - set(model_kwargs)
    if unknown:
        raise ValueError(f"uncond_kwargs has keys {sorted(unknown)} that are not in the model_kwargs "
                         f"{sorted(model_kwargs)}")
    merged = {}
    for key, cond in model_kwargs.items():
        per_sample = torch.is_tensor(cond) and cond.dim() > 0 and cond.shape[0] == batch_size
        if not per_sample:
            if key in uncond_kwargs:
                raise ValueError(f"model_kwargs[{key!r}] must be a per-sample tensor with first dimension "
                                 f"{batch_size} to take an unconditional value")
            merged[key] = cond
            continue
        uncond = uncond_kwargs.get(key, cond)
        uncond = torch.as_tensor(uncond, device=cond.device)
        if uncond.shape == cond.shape[1:]:
            uncond = uncond.unsqueeze(0)  # (...) -> (1, ...)
        if uncond.dim() != cond.dim() or uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, batch_size):
            raise ValueError(f"uncond_kwargs[{key!r}] has shape {tuple(uncond.shape)}; expected {tuple(cond.shape)}, "
                             f"{(1,) + tuple(cond.shape[1:])} or {tuple(cond.shape[1:])}")
        merged[key] = torch.cat([cond, uncond.to(cond.dtype).expand_as(cond)], dim=0)  # (2N, ...)
    return merged


class ClassifierFreeGuidance:
    """model(x_t, t, **kw) -> uncond + s * (cond - uncond) on the guided channels, one doubled forward per call."""

    def __init__(self, model, guidance_scale, uncond_kwargs, guide_channels="all"):
        if not isinstance(uncond_kwargs, dict) or not uncond_kwargs:
            raise ValueError("uncond_kwargs must be a non-empty dict of unconditional model_kwargs, "
                             "e.g. {'y': null_labels} or {'context': null_text_embedding}")
        if guide_channels != "all" and not (isinstance(guide_channels, int) and guide_channels >= 1):
            raise ValueError(f"guide_channels must be 'all' or a positive int, got {guide_channels!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.uncond_kwargs = uncond_kwargs
        self.guide_channels = guide_channels
        self._uncond_by_device = {}  # uncond_kwargs moved to each device once: a copy per step would sync

    def uncond_kwargs_on(self, device):
        """uncond_kwargs with every tensor (or number) on `device`, built at the first call there."""
        moved = self._uncond_by_device.get(device)
        if moved is None:
            moved = self._uncond_by_device[device] = {
                key: torch.as_tensor(value, device=device) if torch.is_tensor(value) or isinstance(value, (int, float))
                else value for key, value in self.uncond_kwargs.items()}
        return moved

    def parameters(self):
        """The wrapped model's parameters (samplers use them to pick a device)."""
        return self.model.parameters() if hasattr(self.model, "parameters") else iter(())

    def __call__(self, x, t, **model_kwargs):
        n = x.shape[0]
        kwargs = merge_cond_uncond_kwargs(model_kwargs, self.uncond_kwargs_on(x.device), n)
        out = self.model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **kwargs)  # (2N, C_out, ...)
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if self.guide_channels == "all" else self.guide_channels
        if k > out.shape[1]:
            raise ValueError(f"guide_channels={k} but the model outputs only {out.shape[1]} channels")
        guided = uncond[:, :k] + self.guidance_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)  # (N, C_out, ...)
