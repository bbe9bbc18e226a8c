"""Samplers (filled in by the generation issue)."""
