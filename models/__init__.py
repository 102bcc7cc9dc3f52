"""Diffusion backbones with Denoising Task Routing: the DiT zoo, the ADM UNet and their routing masks."""
from models.adm import ADM, ADM_models, create_adm
from models.dit import DiT, DiT_models, create_model
from models.routing import ROUTING_KINDS, TaskRouter, build_masks
from models.text_dit import TextDiT, create_text_model

__all__ = ["ADM", "ADM_models", "create_adm", "DiT", "DiT_models", "create_model", "ROUTING_KINDS",
           "TaskRouter", "build_masks", "TextDiT", "create_text_model"]
