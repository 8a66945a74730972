"""The Qwen2.5-3B-shaped model the GPU step benchmarks build (random weights, no download)."""
from __future__ import annotations

from types import SimpleNamespace


def qwen_model(tiny: bool) -> SimpleNamespace:
    """A Qwen2.5-3B-shaped model (``tiny``: chat_http's TINY shape, float32 on the CPU), fp16 on
    a GPU when there is one, SDPA attention, its q/k/v and gate/up weights laid end to end as a
    load does (actors/llm_fused.py). Fields: model, cuda, dev, dtype, shape, laid (groups
    laid). Needs an importable ``agile_rag``."""
    import torch
    from chat_http import REAL, TINY
    from transformers import Qwen2Config, Qwen2ForCausalLM

    try:
        import agile_rag  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"cannot import agile_rag ({e}): put a folder holding an `agile_rag` "
                         "link to the repository root on PYTHONPATH") from e
    from agile_rag.actors.llm_fused import lay_end_to_end

    cuda = torch.cuda.is_available() and not tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    shape = TINY if tiny else REAL
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=32768,
                                             tie_word_embeddings=True)).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    laid = lay_end_to_end(model)
    return SimpleNamespace(model=model, cuda=cuda, dev=dev, dtype=dtype, shape=shape, laid=laid)
