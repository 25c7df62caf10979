"""Render the same (prompt, seed) pairs with every model under comparison, incrementally."""
