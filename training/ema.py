"""The exponential moving average of the parameters that is sampled after training (official DiT, App. C)."""
from collections import OrderedDict

import torch


@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Step the EMA of the parameters towards the current model (App. C: EMA over parameters)."""
    ema_params = OrderedDict(ema_model.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    ema_list, param_list = [e for e, _ in pairs], [p for _, p in pairs]
    # official DiT's ema.mul_(decay).add_(param, alpha=1 - decay), batched over all tensors at once
    torch._foreach_mul_(ema_list, decay)
    torch._foreach_add_(ema_list, param_list, alpha=1 - decay)


def requires_grad(model, flag=True):
    """Set requires_grad for every parameter of a model."""
    for p in model.parameters():
        p.requires_grad = flag
