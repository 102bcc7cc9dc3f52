"""Text-conditional DiT with Denoising Task Routing (Park et al., 2024, appendix C, Fig. 8; Eq. 8).

The MS-COCO model of the paper: adaLN-Zero parameters are regressed from the timestep embedding
only, and every block gains a multi-head cross-attention layer whose keys and values are the
caption's text tokens (a frozen CLIP text encoder's last hidden state, models/text_encoder.py).
Routing wraps the whole block exactly as in DiT: out = (1 - m) * z + Block(m * z).

Choices the paper leaves open (the figure only sketches the block):
- The cross-attention sits between self-attention and MLP, reads a parameter-free LayerNorm of the
  image tokens, and adds its output without adaLN gating; its output projection starts at zero,
  so a fresh block is the identity and the model outputs zeros, as adaLN-Zero intends.
- Keys/values are projected from the text-encoder width context_dim straight to the hidden size
  inside each block (one fused kv linear per block, like the fused qkv of self-attention).
- The null caption for classifier-free guidance is a learned (max_text_len, context_dim) embedding,
  the text analogue of DiT's learned null class: the model carries everything CFG needs (no text
  encoder at sampling time for the unconditional branch), caption features can be precomputed, and
  it is trained by the same caption dropout (p = 0.1) that DiT uses for labels. Its tokens are all
  attended (a dropped caption's padding mask is replaced by all ones).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from models.dit import (Attention, DiT_SHAPES, DiTTrunk, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder,
                        check_transformer_shape, initialize_dit_weights, modulate)
from models.label_dropout import CFG_DROP_PROB, drop_mask
from models.routing import DTR_ALPHA, DTR_BETA, NUM_TIMESTEPS, make_block_router, routed, validate_routing


#################################################################################
#                        Cross-Attention and Text DiT Block                     #
#################################################################################

class CrossAttention(nn.Module):
    """Multi-head cross-attention (Vaswani et al., 2017): queries from image tokens, keys/values from text tokens."""

    def __init__(self, dim, context_dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(context_dim, dim * 2, bias=True)  # text width context_dim -> hidden size
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, context_mask=None):
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)  # (N, heads, T, D / heads)
        kv = self.kv(context).reshape(n, context.shape[1], 2, h, d // h)
        kv = kv.permute(2, 0, 3, 1, 4)  # (2, N, heads, L, D / heads)
        # Boolean mask: True keys take part; (N, L) -> (N, 1, 1, L) broadcasts over heads and queries.
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)  # (N, heads, T, D / heads)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class TextDiTBlock(nn.Module):
    """DiT block with cross-attention to text tokens (Fig. 8); with a router, Eq. 8 around the whole block."""

    def __init__(self, hidden_size, context_dim, num_heads, mlp_ratio=4.0, router=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, context_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        # Regressed from the timestep embedding only: a caption is a token sequence, not one vector.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.routing = router

    def dit_block(self, x, c, context, context_mask):
        """The unrouted block: self-attention, cross-attention and MLP, each with its residual."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x

    def forward(self, x, c, t, context, context_mask=None):
        if self.routing is None:
            return self.dit_block(x, c, context, context_mask)
        mask = self.routing(t, dtype=x.dtype)  # (N, 1, D), one row per sample's original timestep
        return routed(self.dit_block, x, mask, c, context, context_mask)  # Eq. 8


#################################################################################
#                              Core Text DiT Model                              #
#################################################################################

class TextDiT(DiTTrunk):
    """Text-to-image DiT (MS-COCO setting): timestep-only adaLN-Zero, cross-attention to CLIP tokens, DTR."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        context_dim=768,
        max_text_len=77,
        caption_dropout_prob=CFG_DROP_PROB,
        learn_sigma=True,
        routing="none",
        alpha=DTR_ALPHA,
        beta=DTR_BETA,
        routing_seed=0,
        grad_checkpointing=False,
    ):
        super().__init__()
        for name, value in (("context_dim", context_dim), ("max_text_len", max_text_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(caption_dropout_prob, (int, float)) and 0 <= caption_dropout_prob <= 1):
            raise ValueError(f"caption_dropout_prob must lie in [0, 1], got {caption_dropout_prob!r}")
        check_transformer_shape(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio)
        validate_routing(routing, NUM_TIMESTEPS, hidden_size, alpha, beta)
        self.keep_config(locals())
        self.context_dim = context_dim
        self.max_text_len = max_text_len
        self.caption_dropout_prob = caption_dropout_prob

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Learned null caption in text-encoder space (see the module docstring); only with caption dropout,
        # as DiT adds its null class only with label dropout.
        self.null_context = nn.Parameter(torch.zeros(max_text_len, context_dim)) if caption_dropout_prob > 0 else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            TextDiTBlock(hidden_size, context_dim, num_heads, mlp_ratio, router=make_block_router(routing, i, hidden_size, alpha, beta, routing_seed))
            for i in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation, plus zeroed cross-attention outputs so every block starts as the identity."""
        def init_null_caption():
            if self.null_context is not None:
                nn.init.normal_(self.null_context, std=0.02)  # as DiT's label embedding table, null row included
        initialize_dit_weights(self, init_null_caption)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)

    def null_condition(self, with_mask=False):
        """Unconditional model kwargs for diffusion.guidance.ClassifierFreeGuidance (uncond_kwargs).

        with_mask=True adds an all-ones context_mask; use it when the conditional kwargs carry a
        context_mask, since the guidance wrapper would otherwise reuse the caption's mask for the null.
        """
        if self.null_context is None:
            raise ValueError("classifier-free guidance needs a model trained with caption_dropout_prob > 0")
        kwargs = {"context": self.null_context.detach()}  # (L, context_dim), broadcast over the batch
        if with_mask:
            kwargs["context_mask"] = torch.ones(self.max_text_len, dtype=torch.bool, device=self.null_context.device)
        return kwargs

    def check_context(self, n, context, context_mask):
        """Reject captions whose shape does not match the model, and captions with no attended token."""
        expected = (n, self.max_text_len, self.context_dim)
        if context.dim() != 3 or tuple(context.shape) != expected:
            raise ValueError(f"context must have shape (N, max_text_len, context_dim) = {expected}, "
                             f"got {tuple(context.shape)}")
        if context_mask is None:
            return
        if tuple(context_mask.shape) != expected[:2]:
            raise ValueError(f"context_mask must have shape (N, max_text_len) = {expected[:2]}, "
                             f"got {tuple(context_mask.shape)}")
        # A caption with every token masked would make attention NaN; checked where it costs no host sync.
        on_host = context_mask.device.type == "cpu" and not torch.compiler.is_compiling()
        if on_host and not bool(context_mask.any(dim=1).all()):
            raise ValueError("context_mask masks every token of some caption; keep at least one (CLIP's BOS)")

    def drop_captions(self, context, context_mask, force_drop_ids=None):
        """Replace captions by the null caption, at random with caption_dropout_prob or where force_drop_ids == 1."""
        if self.null_context is None:
            raise ValueError("caption dropout needs caption_dropout_prob > 0 (the model has no null caption)")
        drop_ids = drop_mask(context.shape[0], self.caption_dropout_prob, context.device, force_drop_ids)
        context = torch.where(drop_ids[:, None, None], self.null_context.to(context.dtype), context)
        if context_mask is not None:
            context_mask = context_mask | drop_ids[:, None]  # the null caption attends all its tokens
        return context, context_mask

    def forward(self, x, t, context, context_mask=None, force_drop_ids=None):
        """Output (N, out_channels, H, W) for x (N, C, H, W), timesteps t (N,) and text tokens context (N, L, D_text).

        context_mask (N, L): the tokenizer's attention mask (1/True = real token, 0/False = padding).
        """
        if context_mask is not None:
            context_mask = context_mask.bool()
        self.check_context(x.shape[0], context, context_mask)
        if (self.training and self.caption_dropout_prob > 0) or force_drop_ids is not None:
            context, context_mask = self.drop_captions(context, context_mask, force_drop_ids)
        c = self.t_embedder(t)  # (N, D): the timestep alone drives adaLN
        return self.denoise(x, t, c, context, context_mask)


#################################################################################
#                                 Text DiT Configs                              #
#################################################################################
# The official DiT zoo shapes (depth, hidden size, heads) with patch size 2, 4 or 8, called as official DiT's:
# TextDiT_models["TextDiT-B/2"](context_dim=768) (models.create_model("TextDiT-B/2", routing="dtr") adds checks).

TextDiT_models = {
    f"TextDiT-{size}/{patch_size}": partial(TextDiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                            patch_size=patch_size)
    for size, (depth, hidden_size, num_heads) in DiT_SHAPES.items() for patch_size in (2, 4, 8)
}
