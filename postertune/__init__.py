"""Fully fine-tune Stable Diffusion XL on posters: the library behind the DVC stages."""
