"""Closed forms of official DiT's size and cost, written from its layer shapes (independent of models/)."""


def official_parameter_count(depth, d, p, in_ch=4, size=32, classes=1000):
    """Parameters of official DiT (pos_embed included; learned sigma, so 2 * in_ch output channels)."""
    out = 2 * in_ch
    tokens = (size // p) ** 2
    embed = p * p * in_ch * d + d + tokens * d + (256 * d + d + d * d + d) + (classes + 1) * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (d * p * p * out + p * p * out) + (2 * d * d + 2 * d)
    return embed + depth * block + final


def official_forward_flops(depth, d, p, in_ch=4, size=32):
    """FLOPs of one image's forward pass (a multiply-add counts 2; biases, norms and activations not counted).

    Per block: qkv, proj and the 4x MLP on T tokens (12 d^2 multiply-adds each), attention scores and their
    weighted sum (2 T^2 d) and the adaLN linear (6 d^2, once per image).
    """
    tokens = (size // p) ** 2
    embed = tokens * (p * p * in_ch) * d + 256 * d + d * d  # patch conv; timestep MLP (a label lookup is free)
    block = tokens * 12 * d * d + 2 * tokens * tokens * d + 6 * d * d
    final = 2 * d * d + tokens * d * p * p * 2 * in_ch  # adaLN, then the linear to patch pixels
    return 2 * (embed + depth * block + final)
