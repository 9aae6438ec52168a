"""Plumbing shared by every layer: one-line CLI errors, atomic file writes, logging, ZeRO-3 gathering,
optimizer/RNG state files."""
