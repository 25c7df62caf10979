"""SDXL model components: tiny builds for the demo and tests, loaders for real weights."""
