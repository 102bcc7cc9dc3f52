"""Captions -> TextDiT model kwargs, in training (one COCO caption per image and step) and sampling (prompts).

Paper App. C: the condition is the token sequence of a frozen CLIP text encoder. The encoder runs on the
fly on each batch's captions, which costs compute instead of disk (the trade-off against precomputed token
embeddings is measured in README, "Text-to-image on MS-COCO"). In training the caption of each image is
drawn per step by imagedata.coco.draw_captions from a stream seeded by (global seed, step), for the whole
global batch, so resume and world-size invariance hold as for class labels; caption dropout (p = 0.1, the
learned null caption) uses train.py's per-step label-drop draw through force_drop_ids.
"""
from imagedata.coco import LABEL_KIND, caption_uniforms, check_captions_cover, draw_captions, read_coco_captions
from models.text_encoder import FrozenCLIPTextEncoder


class CaptionConditioning:
    """A frozen CLIP encoder, and the COCO captions of the training images (None when only sampling)."""

    def __init__(self, encoder, coco=None):
        self.encoder = encoder
        self.coco = coco

    @classmethod
    def load(cls, text_encoder, captions_path=None, max_length=77, device="cpu"):
        """Read the captions first (cheap, clear errors), then load the encoder (OSError naming --text-encoder)."""
        coco = read_coco_captions(captions_path) if captions_path is not None else None
        return cls(FrozenCLIPTextEncoder(text_encoder, max_length=max_length).to(device), coco)

    @classmethod
    def for_training(cls, text_encoder, captions_path, dataset, source, device="cpu"):
        """Captions checked against the training data's image ids, then the encoder (the slow part) loaded."""
        if getattr(dataset, "label_kind", "class") != LABEL_KIND:
            raise ValueError(f"{source} is not an MS-COCO dataset keyed by image id: extract its latents with "
                             f"extract_features.py --kind coco (or give a COCO image folder with --vae none)")
        coco = read_coco_captions(captions_path)
        check_captions_cover(coco, dataset.label_array(), source)
        return cls(FrozenCLIPTextEncoder(text_encoder).to(device), coco)

    @property
    def name_or_path(self):
        """The encoder's hub name or local directory, as checkpoints record it."""
        return self.encoder.name_or_path

    def model_overrides(self):
        """The TextDiT arguments the encoder fixes: token width and sequence length."""
        return {"context_dim": self.encoder.width, "max_text_len": self.encoder.max_length}

    def encode(self, captions):
        """{"context": (N, L, D), "context_mask": (N, L) bool} for a list of N captions."""
        context, context_mask = self.encoder(captions)
        return {"context": context, "context_mask": context_mask}

    def training_kwargs(self, image_ids, global_seed, step, global_batch_size, rank, world_size, drop_ids):
        """Model kwargs of this rank's samples at `step`: image ids (B,) on CPU, drop_ids (B,) 1 = null caption.

        The caption uniforms are drawn for the whole global batch and rank r keeps r, r + world_size, ...,
        the samples the DistributedSampler dealt it, so the captions do not depend on the world size.
        """
        uniforms = caption_uniforms(global_seed, step, global_batch_size)[rank::world_size]  # (B,)
        captions = draw_captions(self.coco, image_ids.tolist(), uniforms)
        return {**self.encode(captions), "force_drop_ids": drop_ids}
