"""Every attention of DiT, ADM and TextDiT reaches the fused (flash) kernel of scaled_dot_product_attention.

torch's CPU build has a flash-attention kernel with the CUDA kernels' layout rule (unit stride over the
head dimension of (N, heads, L, D) inputs), so forcing it is a CPU check of what a GPU would pick:
the kernel refuses other layouts with "No available kernel" and the forward raises.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models import ADM, DiT, TextDiT

TEXT = dict(context_dim=16, max_text_len=5)


def build(name):
    """(model, inputs) of a tiny model with random weights; ADM in both of guided-diffusion's qkv orders."""
    torch.manual_seed(0)
    if name == "DiT":
        model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4, num_classes=10)
        extra = {"y": torch.tensor([1, 3])}
    elif name.startswith("ADM"):
        model = ADM(input_size=8, in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions="8,4", num_head_channels=16, num_classes=10,
                    use_new_attention_order=name == "ADM-new-order")
        extra = {"y": torch.tensor([1, 3])}
    else:
        model = TextDiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4, **TEXT)
        extra = {"context": torch.randn(2, 5, 16), "context_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])}
    for p in model.parameters():
        p.data.normal_(0, 0.1)  # no zero-initialised output: every path shows in the result
    return model.eval(), (torch.randn(2, 4, 8, 8), torch.tensor([10, 900])), extra


@pytest.mark.parametrize("name", ["DiT", "ADM", "ADM-new-order", "TextDiT"])
def test_attention_runs_on_the_fused_flash_kernel(name):
    model, (x, t), extra = build(name)
    with torch.no_grad():
        reference = model(x, t, **extra)  # torch's own choice
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only the fused kernel: raises if the layout is refused
            fused = model(x, t, **extra)
        with sdpa_kernel(SDPBackend.MATH):  # the unfused L x L softmax, as an independent reference
            math = model(x, t, **extra)
    torch.testing.assert_close(fused, reference, rtol=0, atol=0)
    torch.testing.assert_close(fused, math, rtol=1e-5, atol=1e-5)
