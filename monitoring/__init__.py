"""Watching a training run: console progress bar, TensorBoard scalars, EMA sample grids."""
