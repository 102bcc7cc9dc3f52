"""Seeded sampling shared by sample.py and sample_ddp.py: image i depends only on (global seed, i)."""
