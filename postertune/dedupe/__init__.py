"""Duplicate removal: exact copies by sha256, then near copies by perceptual hash.

``hashing`` turns images into 64-bit pHashes (reduced JPEG decode, parallel, cached),
``search`` finds every pair of hashes within a Hamming distance without comparing all
pairs, ``grouping`` decides which copy of each duplicate group is kept, and ``run``
applies all three to the fetched image table (``params``: the stage's section).
"""
