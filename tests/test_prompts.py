"""Prompts and captions past 77 tokens: encoded in 75-token chunks, in training and in sampling."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from postertune.models.prompts import CHUNK, PromptEncoder, chunk_ids, chunks_needed
from postertune.models.render import render
from postertune.models.tiny import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "poster neon city night rain thriller detective bold title red sky glass tower shadow".split()


def long_text(tokens: int) -> str:
    """A caption of exactly ``tokens`` CLIP tokens (each word here is one token)."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipeline = build_tiny_pipeline(seed=0)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def encoder(pipe, max_token_length: int) -> PromptEncoder:
    return PromptEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, max_token_length)


def test_the_words_are_one_token_each(pipe):
    text = long_text(200)
    assert len(pipe.tokenizer(text, add_special_tokens=False).input_ids) == 200
    assert chunks_needed(pipe.tokenizer, text) == 3 and chunks_needed(pipe.tokenizer, "") == 1


def test_a_200_token_caption_is_three_chunks_and_the_first_is_its_first_75_tokens(pipe):
    text = long_text(200)
    embeds, pooled = encoder(pipe, 225)([text])
    assert embeds.shape[:2] == (1, 3 * (CHUNK + 2))

    first, first_pooled = encoder(pipe, 75)([long_text(75)])
    # equal up to float rounding: three chunks go through the encoders as one batch
    torch.testing.assert_close(embeds[:, : CHUNK + 2], first)
    torch.testing.assert_close(pooled, first_pooled)
    # the second chunk holds tokens 76-150 of the caption, not padding
    empty = encoder(pipe, 225)([long_text(75)])[0]
    assert not torch.equal(embeds[:, CHUNK + 2 : 2 * (CHUNK + 2)], empty[:, CHUNK + 2 : 2 * (CHUNK + 2)])


def test_chunks_are_bos_tokens_eos_and_padding(pipe):
    ids = chunk_ids(pipe.tokenizer_2, [long_text(80)], 3)
    bos, eos, pad = pipe.tokenizer_2.bos_token_id, pipe.tokenizer_2.eos_token_id, pipe.tokenizer_2.pad_token_id
    assert ids.shape == (3, CHUNK + 2)
    assert ids[:, 0].tolist() == [bos] * 3
    assert ids[0, -1] == eos and (ids[0, 1:-1] != pad).all()  # a full chunk
    assert ids[1, 6] == eos and (ids[1, 7:] == pad).all()  # tokens 76-80, then EOS and padding
    assert ids[2, 1] == eos and (ids[2, 2:] == pad).all()  # an empty chunk


def test_one_chunk_is_exactly_what_diffusers_encodes(pipe):
    for text in ("movie poster, thriller, bold title", long_text(120)):  # the long one is cut at 75 tokens
        ours, ours_pooled = encoder(pipe, 75)([text])
        theirs, _, theirs_pooled, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        torch.testing.assert_close(ours_pooled, theirs_pooled, rtol=0, atol=0)


def test_words_past_77_tokens_change_the_image_only_when_chunks_reach_them(pipe, recwarn):
    head = long_text(90)
    variants = [head + " cat", head + " dog"]  # differ only in token 91

    def image(text: str, max_token_length: int) -> np.ndarray:
        return np.asarray(render(pipe, text, "blurry", 0, 2, 5.0, 64, 64, max_token_length))

    assert np.array_equal(image(variants[0], 75), image(variants[1], 75))
    assert not np.array_equal(image(variants[0], 150), image(variants[1], 150))
    assert not [w for w in recwarn if "sequence length is longer" in str(w.message)]
