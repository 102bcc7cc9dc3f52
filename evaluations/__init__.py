"""ADM-protocol evaluation in PyTorch: FID, sFID, Inception Score, precision and recall (SPEC section 7)."""
