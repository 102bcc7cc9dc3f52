"""ADM, the guided-diffusion UNet (Dhariwal & Nichol, 2021), with Denoising Task Routing (Park et al., 2024).

DTR in ADM (paper appendix A.1, Pseudo Code 2): every ResBlock and every AttentionBlock multiplies
the output of its first GroupNorm (+ SiLU in a ResBlock) by the routing mask of the sample's
original timestep, h = mask * SiLU(norm(z)); the skip path z is left as it is, so each block is
Eq. 3, z + Block(m * z), with the mask placed after the normalisation so that masking does not
disturb the group statistics. Each block owns a TaskRouter named `routing` sized to the block's
input channels; routing tables are non-persistent buffers, so the state_dict keys are those of
guided-diffusion (input_blocks / middle_block / output_blocks / out, time_embed, label_emb, ...)
and routing adds no parameters.
"""
import numbers
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.dit import timestep_embedding
from models.constructor_config import constructor_arguments
from models.label_dropout import CFG_DROP_PROB, drop_mask
from models.routing import (DTR_ALPHA, DTR_BETA, NUM_TIMESTEPS, ROUTING_CONFIG_KEYS, check_timesteps,
                            make_block_router, validate_routing)

NORM_GROUPS = 32  # guided-diffusion normalises with GroupNorm(32, C)


#################################################################################
#                          Layers shared by the UNet blocks                     #
#################################################################################

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as guided-diffusion does for fp16 training."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    """GroupNorm with 32 groups; raise a clear error instead of torch's when C is not a multiple of 32."""
    if channels % NORM_GROUPS:
        raise ValueError(f"GroupNorm({NORM_GROUPS}) needs channel counts divisible by {NORM_GROUPS}, got "
                         f"{channels}; choose model_channels * channel_mult as multiples of {NORM_GROUPS}")
    return GroupNorm32(NORM_GROUPS, channels)


def zero_module(module):
    """Zero every parameter of module, so the residual branch it closes starts at zero (ADM Sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def channel_mask(router, t, ndim, dtype):
    """Routing masks (N, C, 1, ...) broadcastable over a (N, C, *spatial) feature with ndim dims."""
    mask = router(t, dtype=dtype).transpose(1, 2)  # (N, 1, C) -> (N, C, 1)
    return mask.reshape(*mask.shape[:2], *([1] * (ndim - 2)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (N, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by 2x2 average pooling."""

    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("average-pool downsampling cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)  # (N, C, H / 2, W / 2)


#################################################################################
#                        Residual and attention blocks                          #
#################################################################################

class ResBlock(nn.Module):
    """ADM residual block: skip(x) + out_layers(scale-shift(in_layers(mask * SiLU(norm(x))))).

    With use_scale_shift_norm the timestep embedding gives (scale, shift) for the second GroupNorm,
    out_norm(h) * (1 + scale) + shift (adaptive group normalisation, ADM Sec. 3). up/down resample
    both the branch (between its SiLU and first conv) and the skip path (resblock_updown, BigGAN style).
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False, router=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)
        self.routing = router

    def forward(self, x, emb, t):
        norm, act, conv = self.in_layers
        h = act(norm(x))
        if self.routing is not None:
            # DTR after the first GroupNorm + SiLU (Pseudo Code 2); the skip path below stays unmasked.
            h = channel_mask(self.routing, t, h.dim(), h.dtype) * h
        h = conv(self.h_upd(h))  # (N, C_out, H', W'), H' = 2H, H / 2 or H
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]  # (N, 2 C_out or C_out, 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention with a residual: x + proj_out(attn(qkv(mask * norm(x))))."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False, router=None):
        super().__init__()
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"attention channels {channels} are not divisible by num_heads {num_heads}")
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(f"attention channels {channels} are not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(self.num_heads, use_new_attention_order)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.routing = router

    def forward(self, x, t):
        n, c, *spatial = x.shape
        x = x.reshape(n, c, -1)  # (N, C, L), L = H * W
        h = self.norm(x)
        if self.routing is not None:
            h = channel_mask(self.routing, t, h.dim(), h.dtype) * h  # DTR after the norm (appendix A.1)
        h = self.proj_out(self.attention(self.qkv(h)))
        return (x + h).reshape(n, c, *spatial)


class QKVAttention(nn.Module):
    """Softmax attention on a fused (N, 3 * C, L) qkv tensor, via scaled_dot_product_attention.

    guided-diffusion has two channel layouts: the legacy one stores [q, k, v] per head
    (heads x 3 x D), the new one stores [q; k; v] each split into heads (3 x heads x D).
    The released 64x64 ImageNet checkpoint was trained with the new order.
    """

    def __init__(self, num_heads, new_order=False):
        super().__init__()
        self.num_heads, self.new_order = num_heads, new_order

    def forward(self, qkv):
        n, width, length = qkv.shape
        d = width // (3 * self.num_heads)
        # One copy to tokens-major (N, L, 3C), so q, k, v come out as (N, heads, L, D) with unit stride
        # over D: the flash / memory-efficient kernels refuse the channels-major (D, L) transposes.
        qkv = qkv.transpose(1, 2).contiguous()  # (N, L, 3 * C)
        if self.new_order:
            q, k, v = qkv.reshape(n, length, 3, self.num_heads, d).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, L, D)
        else:
            q, k, v = qkv.reshape(n, length, self.num_heads, 3, d).permute(3, 0, 2, 1, 4)  # 3 x (N, heads, L, D)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D)
        return out.permute(0, 1, 3, 2).reshape(n, self.num_heads * d, length)  # (N, C, L)

    def extra_repr(self):
        return f"num_heads={self.num_heads}, new_order={self.new_order}"


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of UNet layers; ResBlocks get the embedding and timesteps, attention the timesteps."""

    def forward(self, x, emb, t):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, t)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, t)
            else:
                x = layer(x)
        return x


#################################################################################
#                                 Core ADM Model                                #
#################################################################################

def parse_ints(value, name):
    """Tuple of ints from "32,16,8", an iterable of ints, or one int (YAML reads `attention_resolutions=8` as 8)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{name} must be comma-separated integers, got {value!r}") from None
    return tuple(int(v) for v in value)


class ADM(nn.Module):
    """The guided-diffusion UNet with optional task routing in every ResBlock and AttentionBlock."""

    def __init__(
        self,
        input_size=64,
        in_channels=3,
        model_channels=192,
        num_res_blocks=3,
        attention_resolutions=(32, 16, 8),
        dropout=0.1,
        channel_mult=(1, 2, 3, 4),
        num_classes=1000,
        class_dropout_prob=None,
        learn_sigma=True,
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        conv_resample=True,
        use_new_attention_order=True,
        routing="none",
        alpha=DTR_ALPHA,
        beta=DTR_BETA,
        routing_seed=0,
        grad_checkpointing=False,
    ):
        super().__init__()
        channel_mult = parse_ints(channel_mult, "channel_mult")
        attention_resolutions = parse_ints(attention_resolutions, "attention_resolutions")
        num_classes = 1 if num_classes is None else num_classes
        if class_dropout_prob is None:
            # As DiT: conditional models learn a null class for classifier-free guidance, unconditional ones not.
            class_dropout_prob = CFG_DROP_PROB if num_classes > 1 else 0.0
        self._validate(input_size, model_channels, num_res_blocks, channel_mult, attention_resolutions,
                       num_classes, dropout, class_dropout_prob)
        validate_routing(routing, NUM_TIMESTEPS, model_channels, alpha, beta)
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.config = constructor_arguments(ADM, locals())  # with the defaults resolved above
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.learn_sigma = learn_sigma
        self.grad_checkpointing = grad_checkpointing
        self._num_routers = 0  # running block index, so R-TR draws a different table per block

        # Attention resolutions are given in pixels; blocks see them as downsampling factors ds.
        attention_ds = {input_size // r for r in attention_resolutions}
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes > 1:
            # Row num_classes is the null class of classifier-free guidance; without label dropout the table
            # has guided-diffusion's exact shape, so its released class-conditional checkpoints load strictly.
            self.label_emb = nn.Embedding(num_classes + (class_dropout_prob > 0), time_embed_dim)

        def res_block(ch, out_ch, **kwargs):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch,
                            use_scale_shift_norm=use_scale_shift_norm, router=self._make_router(ch), **kwargs)

        def attention_block(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order, router=self._make_router(ch))

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(attention_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention_block(ch, num_heads), res_block(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = input_block_chans.pop()
                layers = [res_block(ch + skip_ch, model_channels * mult)]  # input: concat with the U skip
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(attention_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)),
        )

    @staticmethod
    def _validate(input_size, model_channels, num_res_blocks, channel_mult, attention_resolutions,
                  num_classes, dropout, class_dropout_prob):
        """Raise ValueError naming the first bad architecture argument."""
        if len(channel_mult) == 0:
            raise ValueError("channel_mult is empty; give one multiplier per resolution level, e.g. (1, 2, 3, 4)")
        if any(m < 1 for m in channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {channel_mult}")
        if not isinstance(num_res_blocks, int) or num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be an integer >= 1, got {num_res_blocks!r}")
        if not isinstance(model_channels, int) or model_channels < 1:
            raise ValueError(f"model_channels must be an integer >= 1, got {model_channels!r}")
        levels = len(channel_mult)
        if input_size < 1 or input_size % 2 ** (levels - 1):
            raise ValueError(f"input_size {input_size} must be divisible by 2 ** (len(channel_mult) - 1) = "
                             f"{2 ** (levels - 1)} to be downsampled {levels - 1} times")
        reachable = [input_size // 2 ** k for k in range(levels)]
        bad = [r for r in attention_resolutions if r not in reachable]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not reached by the UNet; with input_size "
                             f"{input_size} and {levels} levels the resolutions are {reachable}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be None or an integer >= 1 (1 = unconditional), got {num_classes!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        if not (isinstance(class_dropout_prob, (int, float)) and 0 <= class_dropout_prob < 1):
            raise ValueError(f"class_dropout_prob must lie in [0, 1), got {class_dropout_prob!r}")
        if num_classes == 1 and class_dropout_prob > 0:
            raise ValueError("class_dropout_prob > 0 needs a class-conditional model (num_classes > 1): "
                             "an unconditional model has no labels to drop")

    def _make_router(self, channels):
        """One router per routed block, sized to its input channels; R-TR seeds each block differently."""
        c = self.config
        index, self._num_routers = self._num_routers, self._num_routers + 1
        return make_block_router(c["routing"], index, channels, c["alpha"], c["beta"], c["routing_seed"])

    def routing_config(self):
        """The settings that rebuild the routing tables (stored in checkpoints)."""
        return {k: self.config[k] for k in ROUTING_CONFIG_KEYS}

    def forward(self, x, t, y=None, force_drop_ids=None):
        """Model output (N, out_channels, H, W) for x (N, C, H, W), original timesteps t (N,), labels y (N,).

        Label dropout as DiT: while training, labels become the null class num_classes with probability
        class_dropout_prob, or exactly where force_drop_ids == 1 (train.py draws them for the global batch).
        """
        # in range always (original-scale t); integers only where they index routing tables
        check_timesteps(t, x.shape[0], NUM_TIMESTEPS, integral=self.config["routing"] != "none")
        emb = self.time_embed(timestep_embedding(t, self.model_channels))  # (N, 4 * model_channels)
        if self.num_classes > 1:
            if y is None:
                raise ValueError(f"this ADM is class-conditional ({self.num_classes} classes); pass labels y")
            emb = emb + self.label_emb(self.drop_labels(y, force_drop_ids))
        hs, h = [], x
        for module in self.input_blocks:
            h = self._run(module, h, emb, t)
            hs.append(h)
        h = self._run(self.middle_block, h, emb, t)
        for module in self.output_blocks:
            h = self._run(module, torch.cat([h, hs.pop()], dim=1), emb, t)  # (N, C + C_skip, H, W)
        return self.out(h)

    def drop_labels(self, y, force_drop_ids=None):
        """Labels with the dropped ones replaced by the null class (classifier-free guidance training)."""
        if force_drop_ids is None:
            if not (self.training and self.class_dropout_prob > 0):
                return y
        elif self.class_dropout_prob == 0:
            raise ValueError("force_drop_ids given, but this ADM has no null class (class_dropout_prob=0)")
        drop = drop_mask(y.shape[0], self.class_dropout_prob, y.device, force_drop_ids)
        return torch.where(drop, self.num_classes, y)

    def _run(self, module, h, emb, t):
        """Apply one UNet stage, with activation checkpointing when asked for and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, emb, t, use_reentrant=False)
        return module(h, emb, t)


#################################################################################
#                                   ADM Configs                                 #
#################################################################################
# Dhariwal & Nichol (2021), Table 13 / the released 64x64 flags; the DTR paper trains both with
# the cosine schedule, 1000 steps and learned variances.

ADM_IMAGENET64 = dict(
    input_size=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
    attention_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1, learn_sigma=True,
    resblock_updown=True, use_scale_shift_norm=True, use_new_attention_order=True, num_classes=1000,
)
# The zoo, called as official DiT's: ADM_models["ADM-FFHQ64"](model_channels=64) (keyword arguments override).
ADM_models = {"ADM-ImageNet64": partial(ADM, **ADM_IMAGENET64),
              "ADM-FFHQ64": partial(ADM, **{**ADM_IMAGENET64, "num_classes": 1})}
