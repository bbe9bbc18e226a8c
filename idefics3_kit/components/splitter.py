"""Image splitters (filled in by the processor issue)."""
