"""Gaussian diffusion: forward process, posterior, model reverse process, losses and samplers.

Equations from DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021), DDIM (Song et al. 2021)
and v-prediction (Salimans & Ho 2022). Method names and signatures follow official DiT / ADM.
Deviation: every sampler's clip_denoised defaults to False (our models are latent; official DiT's
scripts always pass False explicitly, its library default is True).
"""

import enum
import math

import numpy as np
import torch
from tqdm import tqdm

from .likelihoods import discretized_gaussian_log_likelihood, normal_kl
from .loss_weighting import build_loss_weighting
from .schedules import get_named_beta_schedule  # noqa: F401  (official import path: gaussian_diffusion.get_named_beta_schedule)


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    START_X = enum.auto()   # x_0
    EPSILON = enum.auto()   # eps (DDPM Eq. 11)
    VELOCITY = enum.auto()  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, Sec. 4)


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()        # network outputs log variance
    FIXED_SMALL = enum.auto()    # posterior variance beta_tilde_t
    FIXED_LARGE = enum.auto()    # beta_t (beta_tilde_1 at t = 0, so the decoder likelihood stays finite)
    LEARNED_RANGE = enum.auto()  # log interpolation between beta_tilde_t and beta_t (improved DDPM Eq. 15)


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()           # simple loss (+ VB term when the variance is learned: improved DDPM Eq. 16)
    RESCALED_MSE = enum.auto()  # same, VB term scaled by T / 1000
    KL = enum.auto()            # variational bound only
    RESCALED_KL = enum.auto()   # variational bound times T

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_PREDICTION_NAMES = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.START_X: "x_start",
                     ModelMeanType.VELOCITY: "velocity"}


def split_learned_variance(model_output, channels):
    """(prediction, variance values): the two halves of a learned-variance output (N, 2C, ...)."""
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"learned variance needs {2 * channels} output channels (eps, var), "
                         f"got {model_output.shape[1]}")
    return torch.split(model_output, channels, dim=1)


def mean_flat(tensor):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


class GaussianDiffusion:
    """Owns the schedule math of one diffusion process; samplers and losses are its methods."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, loss_weighting="vanilla",
                 loss_weighting_kwargs=None):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # schedule tables in float64 (as in ADM); the hot path indexes cached torch copies
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t) (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0, so its log is clipped to beta_tilde_1 (only reached by the decoder step)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(first, betas[1:])

        if loss_type.is_vb() and loss_weighting != "vanilla":
            raise ValueError(f"loss_weighting {loss_weighting!r} weights the MSE term; it needs an MSE loss, not use_kl")
        # weighting and its timestep sampler live on the timesteps this process trains on
        self.loss_weighting = build_loss_weighting(loss_weighting, self.alphas_cumprod,
                                                   prediction=_PREDICTION_NAMES[model_mean_type],
                                                   **(loss_weighting_kwargs or {}))
        self.timestep_sampler = self.loss_weighting.timestep_sampler()
        self._tables_by_device = {}

    # ------------------------------------------------------------------ #
    #   Schedule lookup                                                  #
    # ------------------------------------------------------------------ #

    SCHEDULE_TABLES = ("alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
                       "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                       "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                       "posterior_mean_coef1", "posterior_mean_coef2", "log_betas", "fixed_large_variance")

    def place_tables(self, device):
        """Copy every schedule table to `device` now, so that no step of a loop starts with a host copy."""
        for name in self.SCHEDULE_TABLES:
            self._table(name, torch.device(device))
        return self

    def _table(self, name, device):
        """Schedule table `name` as a tensor on `device`, copied there once (a copy per step would sync)."""
        tables = self._tables_by_device.setdefault(device, {})
        table = tables.get(name)
        if table is None:
            table = tables[name] = torch.as_tensor(np.asarray(getattr(self, name))).to(device)
        return table

    def _extract(self, name, t, like):
        """Table `name` at timesteps t (N,), as like.dtype, shaped (N, 1, ..., 1) to broadcast against like."""
        return self._table(name, t.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _model_timesteps(self, t):
        """Timesteps as the model sees them; identity here, original-scale t in SpacedDiffusion."""
        return t

    def _run_model(self, model, x, t, model_kwargs):
        """model(x_t, t, **model_kwargs), t mapped to the scale the model was trained on."""
        return model(x, self._model_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------ #
    #   Forward process q                                                #
    # ------------------------------------------------------------------ #

    def q_mean_variance(self, x_start, t):
        """Mean, variance, log variance of q(x_t | x_0) = N(sqrt(alpha_bar) x_0, 1 - alpha_bar) (DDPM Eq. 4)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start)
        variance = (1.0 - variance).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM Eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance, clipped log variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)."""
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------------ #
    #   Parameterisations                                                #
    # ------------------------------------------------------------------ #

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1)."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def _predict_xstart_from_v(self, x_t, t, v):
        """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (Salimans & Ho 2022, Sec. 4)."""
        return (self._extract("sqrt_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def _v_target(self, x_start, t, noise):
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0."""
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    # ------------------------------------------------------------------ #
    #   Reverse process p                                                #
    # ------------------------------------------------------------------ #

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Mean, variance, log variance and predicted x_0 of p(x_{t-1} | x_t) (improved DDPM Sec. 3.1)."""
        model_output = self._run_model(model, x, t, model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        C = x.shape[1]

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = split_learned_variance(model_output, C)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("log_betas", t, x)
                frac = (var_values + 1) / 2  # network output in [-1, 1] -> v in [0, 1] (improved DDPM Eq. 15)
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if model_output.shape[1] != C:
                raise ValueError(f"fixed variance needs {C} output channels, got {model_output.shape[1]}")
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                model_variance = self._extract("fixed_large_variance", t, x).expand_as(x)
                model_log_variance = torch.log(model_variance)
            else:
                model_variance = self._extract("posterior_variance", t, x).expand_as(x)
                model_log_variance = self._extract("posterior_log_variance_clipped", t, x).expand_as(x)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            pred_xstart = process_xstart(self._predict_xstart_from_v(x, t, model_output))
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the mean: mu + Sigma grad log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 1)."""
        gradient = cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the score: eps - sqrt(1 - alpha_bar) grad (Dhariwal & Nichol 2021, Alg. 2)."""
        alpha_bar = self._extract("alphas_cumprod", t, x)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # ------------------------------------------------------------------ #
    #   DDPM ancestral sampling                                          #
    # ------------------------------------------------------------------ #

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 noise_fn=None):
        """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0 (DDPM Alg. 2).

        noise_fn(x) -> z like x replaces torch.randn_like, e.g. to draw each sample's noise from its own
        generator so that a sample does not depend on the batch it was drawn in.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = noise_fn(x) if noise_fn is not None else torch.randn_like(x)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, noise_fn=None):
        """Sample x_0 by running all num_timesteps ancestral steps; returns the final sample."""
        final = None
        for out in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                  denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                  model_kwargs=model_kwargs, device=device, progress=progress,
                                                  noise_fn=noise_fn):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, noise_fn=None):
        """Yield each step's {"sample", "pred_xstart"} from t = T-1 down to 0."""
        img, device = self._initial_noise(model, shape, noise, device)
        for i in self._reverse_indices(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, noise_fn=noise_fn)
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ #
    #   DDIM sampling                                                    #
    # ------------------------------------------------------------------ #

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, noise_fn=None):
        """One DDIM step from x_t to the previous kept timestep (DDIM Eq. 12, sigma from Eq. 16)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # recompute eps from (possibly clipped) x_0 so the step stays on the x_0 / eps line
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero_mask = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (N, 1, ..., 1)
        noise = noise_fn(x) if noise_fn is not None else torch.randn_like(x)
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                            eta=0.0):
        """Deterministic DDIM step forward in time, x_t -> x_{t+1} (DDIM Sec. 4.3, ODE inversion)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is the deterministic ODE; it needs eta = 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None):
        """Sample x_0 with DDIM over this process's num_timesteps steps (one model call each)."""
        final = None
        for out in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                     denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                     model_kwargs=model_kwargs, device=device,
                                                     progress=progress, eta=eta, noise_fn=noise_fn):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     noise_fn=None):
        """Yield each DDIM step's {"sample", "pred_xstart"} from t = T-1 down to 0."""
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        img, device = self._initial_noise(model, shape, noise, device)
        for i in self._reverse_indices(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, noise_fn=noise_fn)
            yield out
            img = out["sample"]

    def _initial_noise(self, model, shape, noise, device):
        """x_T ~ N(0, I) (or the given noise) and the device to sample on."""
        if device is None:
            if noise is not None:
                device = noise.device
            else:
                param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
                device = param.device if param is not None else torch.device("cpu")
        self.place_tables(device)  # before the first step, not inside it
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device), device
        return torch.randn(*shape, device=device), device

    def _reverse_indices(self, progress):
        """T-1, ..., 0, wrapped in a progress bar on request."""
        indices = list(range(self.num_timesteps))[::-1]
        return tqdm(indices) if progress else indices

    # ------------------------------------------------------------------ #
    #   Training losses                                                  #
    # ------------------------------------------------------------------ #

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=False, model_kwargs=None):
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim; L_0 = decoder NLL (DDPM Eq. 5)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, global_t=None):
        """Per-sample losses at timesteps t: {"loss", "mse", "vb"} (improved DDPM Eq. 16, L_hybrid).

        global_t: under DDP, the whole global batch's timesteps of which t is this rank's share (ANT-UW
        counts its clusters from them instead of an all-reduce); other weightings ignore it.

        "mse" is the raw prediction error, "loss" = loss_weighting(mse, t) + vb, or for ANT-UW
        loss_weighting(mse + vb, t); the VB term is computed with the mean detached (so it only
        trains the variance) and weighted by ANT-UW only.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._run_model(model, x_t, t, model_kwargs)
        return self.loss_terms(model_output, x_start, x_t, t, noise, global_t)

    def loss_terms(self, model_output, x_start, x_t, t, noise, global_t=None):
        """training_losses after the model call: {"loss", "mse", "vb", ...} from the model's output at x_t.

        About a hundred small element-wise kernels: compile_loss_terms() fuses them into a few.
        """
        terms = {}
        C = x_t.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = split_learned_variance(model_output, C)
            # the VB term sees the mean as a constant: it trains the variance only (improved DDPM Sec. 3.1)
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # the MSE term is a sum over T terms while VB is one; ADM rescales by T / 1000
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        elif self.model_mean_type == ModelMeanType.VELOCITY:
            target = self._v_target(x_start, t, noise)
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} != target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if self.loss_weighting.weights_vb:
            # ANT-UW: the cluster's uncertainty weights its whole loss, MSE + VB (the ANT / DTR releases)
            terms["loss"] = self.loss_weighting(terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"], t,
                                                global_t=global_t)
            return terms
        terms["weighted_mse"] = self.loss_weighting(terms["mse"], t, global_t=global_t)
        terms["loss"] = terms["weighted_mse"] + terms["vb"] if "vb" in terms else terms["weighted_mse"]
        return terms

    def compile_loss_terms(self, **compile_kwargs):
        """Run loss_terms through torch.compile from now on (train.py --compile); returns self."""
        self.loss_terms = torch.compile(self.loss_terms, **compile_kwargs)  # instance attribute shadows the method
        return self
