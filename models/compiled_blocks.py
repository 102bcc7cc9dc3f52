"""torch.compile per repeated block, as LightningDiT does, instead of around the whole (DDP) model.

Compiling each block keeps DDP's gradient hooks, activation checkpointing and the model's Python-side
checks (timestep ranges, label dropout) outside the graphs; the blocks of a DiT all share one
compiled graph (same code, same shapes), so compile time does not grow with depth. Module.compile
compiles in place, so parameter names and checkpoints stay those of the plain model.
"""

from torch import nn

BLOCK_LISTS = ("blocks", "input_blocks", "output_blocks")  # DiT / TextDiT; ADM's UNet stages
SINGLE_BLOCKS = ("middle_block",)  # ADM


def repeated_blocks(model):
    """The model's repeated blocks in forward order: DiT / TextDiT blocks, or ADM's UNet stages."""
    found = []
    for name in BLOCK_LISTS + SINGLE_BLOCKS:
        part = getattr(model, name, None)
        if isinstance(part, nn.ModuleList):
            found.extend(part)
        elif isinstance(part, nn.Module):
            found.append(part)
    if not found:
        raise ValueError(f"{type(model).__name__} has none of {BLOCK_LISTS + SINGLE_BLOCKS} to compile")
    return found


def compile_blocks(model, **compile_kwargs):
    """Compile every repeated block of `model` in place (Module.compile); returns the number compiled."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
