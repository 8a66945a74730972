"""Prompt text to token ids straight from the Rust tokenizer (actors/prompt_tokens.py): the same
ids as transformers' call, with the real SmolLM2 and MiniLM tokenizers; transformers' call
wherever it would do more than encode."""
from __future__ import annotations

import os

import pytest

from agile_rag.actors.prompt_tokens import direct_backend, text_ids
from agile_rag.runtime.liveconfig import resolve_path

from support import ROOT, SMOLLM, minilm_dir

TEXTS = ["Hello, world!", "", "  spaces   and\ttabs\n\nnew lines ",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
         "[CLS] already [SEP] marked [PAD] tokens", "Ünïcödé, 中文, emoji 🙂 and math ∑x²",
         " ".join(f"word{i}" for i in range(300))]


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def tok(request):
    from transformers import AutoTokenizer
    if request.param == "minilm":
        tok = AutoTokenizer.from_pretrained(minilm_dir())
        # its tokenizer.json sets truncation and padding: transformers' call, then straight
        assert direct_backend(tok) is None
        assert text_ids(tok, TEXTS[-1]) == list(tok(TEXTS[-1])["input_ids"])
        return tok
    gguf = resolve_path(SMOLLM, ROOT)           # SmolLM2's tokenizer, from its GGUF
    return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))


@pytest.mark.parametrize("special", [True, False])
def test_the_ids_are_transformers_ids(tok, special):
    assert direct_backend(tok) is not None          # transformers' own Rust-backed class
    for text in TEXTS:
        want = list(tok(text, add_special_tokens=special)["input_ids"])
        got = text_ids(tok, text, add_special_tokens=special)
        assert got == want, text
        assert all(isinstance(i, int) for i in got)


def test_truncation_padding_or_split_special_tokens_take_transformers_call(tok):
    backend = tok.backend_tokenizer
    backend.enable_truncation(8)
    try:
        assert direct_backend(tok) is None
        text = TEXTS[-1]
        # transformers' call clears the backend's truncation (it was not asked for), as before
        assert text_ids(tok, text) == list(tok(text)["input_ids"])
        assert len(text_ids(tok, text)) > 8
    finally:
        backend.no_truncation()
    backend.enable_padding(length=64)
    try:
        assert direct_backend(tok) is None
    finally:
        backend.no_padding()
    tok.split_special_tokens = True
    try:
        assert direct_backend(tok) is None
        assert text_ids(tok, TEXTS[3]) == list(tok(TEXTS[3])["input_ids"])
    finally:
        tok.split_special_tokens = False
        backend.encode_special_tokens = False
    assert direct_backend(tok) is not None


def test_a_subclass_with_its_own_encoding_takes_its_call(tok):
    class Own(type(tok)):
        def _encode_plus(self, *a, **k):
            out = super()._encode_plus(*a, **k)
            out["input_ids"] = [7, *out["input_ids"]]
            return out
    own = Own.__new__(Own)
    own.__dict__.update(tok.__dict__)
    assert direct_backend(own) is None
    assert text_ids(own, "Hello")[0] == 7
