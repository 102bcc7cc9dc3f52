"""Diffusion backbones with Denoising Task Routing: the DiT zoo, the ADM UNet, the text DiT and their routing masks."""
from models.adm import ADM, ADM_models
from models.dit import DiT, DiT_models
from models.registry import (MODEL_FAMILIES, build_from_config, check_overrides, create_model, family_of,
                             model_config, model_names)
from models.routing import ROUTING_KINDS, TaskRouter, build_masks
from models.text_dit import TextDiT, TextDiT_models

__all__ = ["ADM", "ADM_models", "DiT", "DiT_models", "MODEL_FAMILIES", "build_from_config", "check_overrides",
           "create_model", "family_of", "model_config", "model_names", "ROUTING_KINDS", "TaskRouter",
           "build_masks", "TextDiT", "TextDiT_models"]
