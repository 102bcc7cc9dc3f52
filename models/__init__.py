"""Diffusion backbones with Denoising Task Routing: the DiT zoo and its routing masks."""
from models.adm import ADM, ADM_models, create_adm
from models.dit import DiT, DiT_models, create_model
from models.routing import ROUTING_KINDS, TaskRouter, build_masks

__all__ = ["DiT", "DiT_models", "create_model", "ROUTING_KINDS", "TaskRouter", "build_masks"]
