"""The exponential moving average of the parameters that is sampled after training (official DiT, App. C)."""
import torch


class EMAUpdater:
    """ema <- ema + (1 - decay) (param - ema) over parameter lists built once: one foreach kernel per step.

    torch._foreach_lerp_ computes official DiT's ema.mul_(decay).add_(param, alpha=1 - decay) in one pass over
    memory instead of two (equal up to fp32 rounding; decay 0 copies, decay 1 keeps, both exactly). The lists
    hold the modules' own tensors, so they stay valid through load_state_dict (a resume copies in place).
    """

    def __init__(self, ema_model, model):
        ema_params = dict(ema_model.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        missing = [name for name in names if name not in ema_params]
        if missing:
            raise ValueError(f"the EMA model lacks parameters {missing[:3]} of the model")
        self.ema_params = [ema_params[name] for name in names]
        self.params = [param.detach() for _, param in model.named_parameters()]

    @torch.no_grad()
    def __call__(self, decay=0.9999):
        """One EMA step with the given decay."""
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)


def update_ema(ema_model, model, decay=0.9999):
    """Step the EMA of the parameters towards the current model (App. C: EMA over parameters)."""
    EMAUpdater(ema_model, model)(decay)


def requires_grad(model, flag=True):
    """Set requires_grad for every parameter of a model."""
    for p in model.parameters():
        p.requires_grad = flag
