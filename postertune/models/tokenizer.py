"""The real CLIP BPE tokenizer, built offline from the vocabulary open_clip ships.

open_clip's ``bpe_simple_vocab_16e6.txt.gz`` holds the merges of OpenAI's CLIP
tokenizer. Lines 1..48894 of it, with the byte alphabet, give exactly the 49,408-token
vocabulary of ``openai/clip-vit-large-patch14``, so this tokenizer encodes prompts the
same way the SDXL tokenizers do without downloading anything.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

# found, not imported: importing open_clip loads torch, most of a caption run's memory
_VOCAB_FILE = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
_MERGE_LINES = slice(1, 49152 - 256 - 2 + 1)  # 48894 merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    merges = gzip.open(_VOCAB_FILE).read().decode("utf-8").split("\n")[_MERGE_LINES]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Save a complete ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs).

    SDXL's first tokenizer pads with ``<|endoftext|>``; the second (OpenCLIP bigG) pads
    with ``!`` (id 0).
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    pairs = [tuple(m.split()) for m in merges]
    tok = CLIPTokenizer(vocab=vocab, merges=pairs, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(folder)


@lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The in-memory CLIP tokenizer, one per pad token and process (read-only: share it)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), pad_token)
        return CLIPTokenizer.from_pretrained(tmp)
