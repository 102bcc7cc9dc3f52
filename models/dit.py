"""DiT (Peebles & Xie, 2023) with Denoising Task Routing (Park et al., 2024, Eq. 8).

Parameter names, initialisation and outputs follow the official DiT code, so its released
checkpoints (DiT-XL-2-256x256.pt, ...) load with strict=True. Routing masks are fixed,
non-persistent buffers and add no parameters.
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffusion.guidance import ClassifierFreeGuidance
from models.constructor_config import constructor_arguments
from models.label_dropout import CFG_DROP_PROB, drop_mask
from models.routing import (DTR_ALPHA, DTR_BETA, NUM_TIMESTEPS, ROUTING_CONFIG_KEYS, check_timesteps,
                            make_block_router, routed, validate_routing)


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels        #
#################################################################################

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (N, dim) of timesteps t (N,), cosines first as in official DiT and ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) to patch tokens (N, T, D) by a strided convolution."""

    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), where T = H * W / patch_size ** 2


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps with sinusoidal features and a two-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    timestep_embedding = staticmethod(timestep_embedding)  # official DiT's name for it

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class-label embedding; label dropout for classifier-free guidance uses index num_classes."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class, at random or where force_drop_ids == 1."""
        drop_ids = drop_mask(labels.shape[0], self.dropout_prob, labels.device, force_drop_ids)
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, via scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, T, D / heads)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Pointwise feed-forward layer with tanh-approximated GELU, as official DiT."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero; with a router it computes Eq. 8: (1 - m) * z + DiTBlock(m * z)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, router=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.routing = router  # the authors' checkpoints name its table blocks.{i}.routing._unit_mapping

    def dit_block(self, x, c):
        """The unrouted DiT block of Eq. 5, both inner residuals included."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward(self, x, c, t):
        if self.routing is None:
            return self.dit_block(x, c)
        mask = self.routing(t, dtype=x.dtype)  # (N, 1, D), one row per sample's original timestep
        return routed(self.dit_block, x, mask, c)  # Eq. 8


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and linear projection back to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def check_transformer_shape(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio):
    """ValueError naming the first constructor argument that cannot build a DiT (e.g. --model-arg depth=0)."""
    for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < float("inf"):
        raise ValueError(f"mlp_ratio must be a finite number > 0, got {mlp_ratio!r}")
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")


class DiTTrunk(nn.Module):
    """The transformer trunk DiT and TextDiT share: patch tokens through routed blocks and back to an image.

    A subclass builds x_embedder, t_embedder, pos_embed, blocks and final_layer (in official DiT's order, so the
    initialisation draws the same numbers), calls keep_config(locals()) and runs denoise(x, t, c, ...).
    """

    def keep_config(self, arguments):
        """self.config = every constructor argument by name (what a checkpoint stores to rebuild the model), and
        the shape attributes the samplers and train.py read."""
        self.config = constructor_arguments(type(self), arguments)
        self.learn_sigma, self.in_channels = self.config["learn_sigma"], self.config["in_channels"]
        self.out_channels = self.in_channels * 2 if self.learn_sigma else self.in_channels
        self.input_size, self.patch_size = self.config["input_size"], self.config["patch_size"]
        self.grad_checkpointing = self.config["grad_checkpointing"]

    def routing_config(self):
        """The settings that rebuild the routing tables (stored in checkpoints)."""
        return {k: self.config[k] for k in ROUTING_CONFIG_KEYS}

    def unpatchify(self, x):
        """(N, T, patch_size**2 * C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def denoise(self, x, t, c, *block_args):
        """Output (N, out_channels, H, W) of x (N, C, H, W) under adaLN condition c (N, D); every block also gets
        t (its routing mask) and block_args (the text DiT's tokens)."""
        if self.config["routing"] != "none":  # the mask tables are indexed by t
            check_timesteps(t, x.shape[0], NUM_TIMESTEPS)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), where T = H * W / patch_size ** 2
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, t, *block_args, use_reentrant=False)
            else:
                x = block(x, c, t, *block_args)
        x = self.final_layer(x, c)  # (N, T, patch_size ** 2 * out_channels)
        return self.unpatchify(x)


class DiT(DiTTrunk):
    """Diffusion model with a Transformer backbone, optionally with task routing in every block."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=None,
        num_classes=1000,
        learn_sigma=True,
        routing="none",
        alpha=DTR_ALPHA,
        beta=DTR_BETA,
        routing_seed=0,
        grad_checkpointing=False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (1 = unconditional), got {num_classes}")
        if class_dropout_prob is None:
            # Unconditional models (num_classes = 1) get no label dropout and no null class.
            class_dropout_prob = CFG_DROP_PROB if num_classes > 1 else 0.0
        check_transformer_shape(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio)
        validate_routing(routing, NUM_TIMESTEPS, hidden_size, alpha, beta)
        self.keep_config(locals())
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Will use fixed sin-cos embedding:
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio,
                     router=make_block_router(routing, i, hidden_size, alpha, beta, routing_seed))
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Official DiT initialisation, label embeddings N(0, 0.02)."""
        initialize_dit_weights(self, lambda: nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02))

    def forward(self, x, t, y, force_drop_ids=None):
        """Model output (N, out_channels, H, W) for inputs x (N, C, H, W), timesteps t (N,), labels y (N,)."""
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        return self.denoise(x, t, c)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels="all"):
        """Official DiT's guided forward on a doubled batch (first half conditional, second half null labels):
        diffusion.guidance.ClassifierFreeGuidance on the first half, returned twice (samplers keep the first).

        guide_channels="all" guides every predicted-noise channel; guide_channels=3 reproduces the
        official DiT code, which guides only the first three channels "for exact reproducibility".
        Learned-variance channels are never guided.
        """
        if self.num_classes == 1 or self.y_embedder.dropout_prob == 0:
            raise ValueError("classifier-free guidance needs a conditional model trained with label dropout")
        k = self.in_channels if guide_channels == "all" else int(guide_channels)
        if not 1 <= k <= self.in_channels:
            raise ValueError(f"guide_channels must be 'all' or 1..{self.in_channels}, got {guide_channels!r}")
        n = len(x) // 2
        guided = ClassifierFreeGuidance(self.forward, cfg_scale, {"y": y[n:]}, k)(x[:n], t[:n], y=y[:n])
        return torch.cat([guided, guided], dim=0)  # (2N, C_out, H, W)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module.load_state_dict, with a clear error for routed checkpoints in an unrouted model."""
        if any(k.endswith("routing._unit_mapping") for k in state_dict) and self.config["routing"] == "none":
            raise ValueError("the checkpoint carries DTR routing masks (blocks.*.routing._unit_mapping) but "
                             "the model was built with routing='none'; pass the checkpoint's routing settings")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def initialize_dit_weights(model, init_condition_embedding):
    """Official DiT initialisation of the parts every DiT variant shares: xavier linears, the fixed sin-cos
    pos_embed, the patch embedding like a linear layer, N(0, 0.02) timestep MLP, and adaLN-Zero (every
    block's modulation and the output layer zeroed, so a fresh model is the identity and outputs zeros).

    init_condition_embedding() initialises the class / caption embedding at the official point in the
    sequence, so a seed gives the same weights as the official code.
    """
    def _basic_init(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
    model.apply(_basic_init)

    grid_size = int(model.x_embedder.num_patches ** 0.5)
    pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid_size)
    model.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

    # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.constant_(model.x_embedder.proj.bias, 0)

    init_condition_embedding()
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)

    for block in model.blocks:
        nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.linear.weight, 0)
    nn.init.constant_(model.final_layer.linear.bias, 0)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# Follows MAE's 2D sin-cos embedding, as official DiT does (checkpoints store the result).

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) fixed 2D sin-cos positional embedding."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H * W, D / 2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H * W, D / 2)
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M, embed_dim) sin-cos embedding of the positions pos (any shape, M elements)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D / 2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D / 2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# Official DiT's zoo: DiT_models["DiT-XL/2"](input_size=32, num_classes=1000) builds a model as in official DiT
# (keyword arguments override the preset; models.create_model adds checks). size -> (depth, hidden_size, num_heads),
# each with patch size 2, 4 or 8.
DiT_SHAPES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
DiT_models = {
    f"DiT-{size}/{patch_size}": partial(DiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                        patch_size=patch_size)
    for size, (depth, hidden_size, num_heads) in DiT_SHAPES.items() for patch_size in (2, 4, 8)
}
