"""What train.py shows about a run besides its log lines: the progress bar, TensorBoard, EMA sample grids.

One object, so the training loop calls it at three places: after every step, at every log line, at the end.
"""
import os

from monitoring.progress import progress_bar
from monitoring.sample_grid import ema_sample_grid, save_grid
from monitoring.tensorboard_log import TensorBoardLog, TimestepBucketLoss


class TrainingMonitor:
    """Progress bar (rank 0, terminal only), optional TensorBoard (--tensorboard), grids (--sample-every)."""

    def __init__(self, run_dir, rank, world_size, device, max_steps, done_steps, num_timesteps,
                 tensorboard=False, sample_every=None, load_vae=None):
        self.run_dir, self.rank, self.world_size = run_dir, rank, world_size
        self.bar = progress_bar(max_steps, done_steps, rank)
        self.tensorboard = TensorBoardLog(run_dir, rank) if tensorboard else None
        self.buckets = TimestepBucketLoss(num_timesteps, device) if tensorboard else None
        self.sample_every = sample_every
        self.load_vae = load_vae  # called once, at the first grid of a latent model
        self.vae = None

    def after_step(self, t, losses):
        """Every step: advance the bar; with TensorBoard, add per-sample losses (B,) to their t buckets."""
        self.bar.update(1)
        if self.buckets is not None:
            self.buckets.add(t, losses)

    def at_log(self, step, scalars):
        """At a log line: write the scalars and the per-bucket loss (a collective with TensorBoard on)."""
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, {**scalars, **self.buckets.means(self.world_size)})

    def sample_grid(self, step, ema, diffusion_config, global_seed, latent_scale):
        """Rank 0 writes <run>/samples/<step:07d>.png every --sample-every steps; returns its path or None."""
        if not self.sample_every or step % self.sample_every or self.rank != 0:
            return None
        if self.vae is None and self.load_vae is not None:
            self.vae = self.load_vae()
        grid = ema_sample_grid(ema, diffusion_config, global_seed, self.vae, latent_scale)
        path = os.path.join(self.run_dir, "samples", f"{step:07d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_grid(path, grid)
        if self.tensorboard is not None:
            self.tensorboard.writer.add_image("ema_samples", grid, step, dataformats="HWC")
        return path

    def close(self):
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
