"""The LLM's path without continuous batching: one transformers ``generate`` per chat, for
models the batch engine cannot drive or with ``continuous_batching: false``. Same text side
(stop strings, streaming) and the same grammar constraint as the batch."""
from __future__ import annotations

import threading
from typing import Any

import torch

from .batch_plan import SeqRequest
from .messages import ChatResult
from .states import FinishReason
from .text_stream import TailStreamer
from .torch_util import as_list


def generate(model: Any, tokenizer: Any, req: SeqRequest) -> ChatResult:
    """One ``generate`` for this chat (its prompt encoded), streaming through the same
    :class:`TextTail` as the batch. A chat handed over from a batch engine continues where it
    left off (its prompt and the tokens it had)."""
    msg = req.msg
    assert req.prompt is not None
    ids = torch.tensor([req.context()], dtype=torch.long)
    left = req.max_new - req.generated
    streamer = TailStreamer(req.tail, eos_ids(model, tokenizer))
    kwargs: dict[str, Any] = {"max_new_tokens": left, "streamer": streamer,
                              "stopping_criteria": [_StopWhen(streamer, msg.cancel,
                                                              req.constraint)],
                              "attention_mask": torch.ones_like(ids, device=model.device)}
    if msg.temperature > 0:
        kwargs.update(do_sample=True, temperature=msg.temperature, top_p=msg.top_p, top_k=0)
        if msg.seed is not None:
            torch.manual_seed(msg.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if req.constraint is not None:
        kwargs["logits_processor"] = [_Constrained(req.constraint)]
    if left > 0 and not msg.cancel.is_set():
        with torch.inference_mode():
            model.generate(ids.to(model.device), pad_token_id=pad, **kwargs)
    req.generated += streamer.n_tokens
    text = req.tail.finish()
    if msg.cancel.is_set():
        reason = FinishReason.CANCELLED
    elif req.tail.hit_stop or streamer.hit_eos:
        reason = FinishReason.STOP
    elif req.generated >= req.max_new:
        reason = FinishReason.LENGTH
    else:
        reason = FinishReason.STOP
    return ChatResult(text=text, finish_reason=reason, prompt_tokens=len(req.prompt),
                      completion_tokens=req.generated)

class _StopWhen:
    """Stopping criterion: a stop string was seen, the grammar is complete, or the client
    went away."""

    def __init__(self, streamer: TailStreamer, cancel: threading.Event, constraint: Any = None):
        self.streamer = streamer
        self.cancel = cancel
        self.constraint = constraint

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.streamer.tail.hit_stop or self.streamer.hit_eos or self.cancel.is_set() \
            or (self.constraint is not None and self.constraint.finished())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Constrained:
    """Logits processor for ``generate``: the grammar accepts each sampled token (seen as the
    last input id of the next step) and masks the next step's logits."""

    def __init__(self, constraint: Any):
        self.constraint = constraint
        self.first = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.first:
            self.constraint.accept(int(input_ids[0, -1]))
        self.first = False
        scores = scores.float()
        self.constraint.fill_mask(scores[0])
        return scores


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = set(as_list(getattr(tokenizer, "eos_token_id", None)))
    gen_cfg = getattr(model, "generation_config", None)
    return eos | set(as_list(getattr(gen_cfg, "eos_token_id", None)))
