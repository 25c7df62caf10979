"""The curate stage: score the captioned training set and keep the best, varied posters."""
