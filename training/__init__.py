"""Library pieces of train.py: the EMA, the cost of one training step."""
