"""How a script joins its process group: torchrun, or a single process."""
