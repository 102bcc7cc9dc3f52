"""Frozen CLIP text encoder for the text-conditional DiT (paper Sec. 5.1 "Models", appendix C).

The paper conditions on "text tokens from CLIP" without naming the checkpoint; we default to
openai/clip-vit-large-patch14 (width 768, 77 tokens), the text encoder of Stable Diffusion v1,
whose VAE the paper's DiT experiments also use. Needs the optional `transformers` package.
"""
import os

import torch
from torch import nn

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def missing_encoder_message(name_or_path):
    """One line saying where the CLIP weights were looked for and how to provide them."""
    from huggingface_hub.constants import HF_HUB_CACHE
    if os.path.isdir(name_or_path):
        return (f"--text-encoder {name_or_path}: the directory holds no CLIPTextModel (config.json and weights, "
                f"as save_pretrained writes them)")
    return (f"--text-encoder {name_or_path}: CLIP text encoder not found locally nor in the hub cache {HF_HUB_CACHE} "
            f"(offline?); download it once with `huggingface-cli download {name_or_path}` where there is internet, "
            f"or pass --text-encoder a local directory holding it")


class FrozenCLIPTextEncoder(nn.Module):
    """Captions -> CLIP last hidden states (N, L, D) and the tokenizer's attention mask (N, L); never trained."""

    def __init__(self, name_or_path=DEFAULT_CLIP, max_length=77):
        super().__init__()
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as error:
            raise ImportError("FrozenCLIPTextEncoder needs transformers: pip install 'dtr[text]'") from error
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2 (BOS and EOS), got {max_length!r}")
        # A local directory or a hub name; with HF_HUB_OFFLINE=1 only local files and the cache are used.
        # The model first: offline, transformers 5 builds an EMPTY tokenizer for a name it cannot find.
        try:
            self.transformer = CLIPTextModel.from_pretrained(name_or_path)
        except OSError as error:
            raise OSError(missing_encoder_message(name_or_path)) from error
        self.tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
        if len(self.tokenizer) != self.transformer.config.vocab_size:
            raise OSError(f"the CLIP tokenizer of {name_or_path!r} has {len(self.tokenizer)} tokens but its text model "
                          f"{self.transformer.config.vocab_size}: tokenizer files missing or incomplete")
        positions = self.transformer.config.max_position_embeddings
        if max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds the encoder's {positions} position embeddings")
        self.name_or_path = name_or_path
        self.max_length = max_length
        self.width = self.transformer.config.hidden_size  # the TextDiT's context_dim
        self.transformer.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Stays in eval mode: the encoder is frozen (no dropout), whatever the parent module does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions):
        """Encode a list of N strings to (last_hidden_state (N, max_length, D), attention_mask (N, max_length) bool)."""
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, got a single string")
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.transformer.parameters()).device
        input_ids = tokens["input_ids"].to(device)  # (N, L)
        # No attention_mask into CLIP: its text transformer is causal and padding follows the caption,
        # so real tokens never see padding; this is how CLIP was trained and how Stable Diffusion calls it.
        hidden = self.transformer(input_ids=input_ids).last_hidden_state  # (N, L, D)
        return hidden, tokens["attention_mask"].to(device).bool()
