"""Streamed text from one Rust call per step (issue 15): ``decode_windows`` gives exactly what
``tokenizer.decode(w, skip_special_tokens=True)`` gives, window by window, with SmolLM2's real
tokenizer (byte-level BPE: split UTF-8 characters, special tokens, empty windows), and falls
back to ``batch_decode`` / ``decode`` for tokenizers that clean up after decoding."""
from __future__ import annotations

import os
import random

import pytest
from transformers import AutoTokenizer

from agile_rag.actors.text_stream import TextTail, advance, decode_windows
from agile_rag.runtime.liveconfig import resolve_path

from support import ROOT, SMOLLM, minilm_dir


@pytest.fixture(scope="module")
def smol():
    gguf = resolve_path(SMOLLM, ROOT)
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


def test_one_call_decodes_every_window_as_decode_does(smol):
    assert smol.clean_up_tokenization_spaces is False        # the one-call path applies
    rng = random.Random(0)
    text = "Hello, world! Ça va? 日本語 🙂 it's <|im_end|> fine.\n\tTabs."
    ids = smol(text)["input_ids"] + [smol.eos_token_id]
    windows = [ids[i:j] for i in range(len(ids)) for j in range(i, min(len(ids), i + 4) + 1)]
    windows += [[rng.randrange(len(smol)) for _ in range(rng.randrange(0, 5))]
                for _ in range(500)]
    assert decode_windows(smol, windows) == \
        [smol.decode(w, skip_special_tokens=True) for w in windows]


def test_streamed_text_is_the_whole_decode(smol):
    text = "Ça va? 日本語 🙂 The capital of France is Paris."
    ids = smol(text)["input_ids"]
    tails = [TextTail(smol, [], None) for _ in range(3)]
    for k, tid in enumerate(ids):
        for t in tails[: 1 + k % 3]:          # rows of different lengths in one call
            t.ids.append(tid)
        advance(smol, tails[: 1 + k % 3])
    assert tails[0].finish() == smol.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_that_cleans_up_goes_through_its_own_decode():
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.clean_up_tokenization_spaces = True        # "hello , world" -> "hello, world"
    ids = tok("hello , world . it ' s fine")["input_ids"]
    windows = [ids[:k] for k in range(len(ids) + 1)]
    got = decode_windows(tok, windows)
    assert got == [tok.decode(w, skip_special_tokens=True) for w in windows]
    assert got[-1] == "hello, world. it's fine"
