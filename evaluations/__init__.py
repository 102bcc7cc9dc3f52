"""ADM-protocol evaluation in PyTorch: FID, sFID, Inception Score, precision and recall (Sec. 5.1, App. C: ADM's protocol)."""
