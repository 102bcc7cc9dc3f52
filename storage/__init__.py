"""What runs write to disk: crash-safe file writes and the checkpoint format."""
