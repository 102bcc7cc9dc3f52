"""The ground floor every package may import: the project's error type, flag value parsing, atomic file writes.

It imports nothing of this repository; see README's layout table for the floors above it.
"""
