"""Score the sampled images (CLIP score, LAION aesthetic score, CMMD) and compare models."""
