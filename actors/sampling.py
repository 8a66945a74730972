"""How the batch loop picks each row's next token from the logits of a step (moved out of
actors/batch_runner.py, which computes the logits): greedy rows by one argmax and one copy to
the host, or left on the device as the next step's input (decoding ahead, actors/
llm_batching.py); sampled rows with OpenAI's presence and frequency penalties, a grammar's mask
(actors/llm_grammar.py), temperature, top-p and a per-request seed; the log-probabilities a
chat asked for."""
from __future__ import annotations

from typing import Any

import torch

from .batch_plan import SeqRequest

__all__ = ["sample", "sample_ahead", "read_ahead"]


def sample_ahead(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Greedy tokens of every row, left where the logits are (the next step's input) and
    copied to pinned host memory without waiting: (tokens, host copy, the event recorded
    after the copy; None on a CPU). :func:`read_ahead` reads them."""
    tokens = logits.argmax(dim=-1)
    if tokens.device.type != "cuda":
        return tokens, tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return tokens, host, ready


def read_ahead(host: torch.Tensor, ready: Any) -> list[int]:
    """The tokens :func:`sample_ahead` copied, once the copy is done."""
    if ready is not None:
        ready.synchronize()
    return host.tolist()


def sample(logits: torch.Tensor, reqs: list[SeqRequest]) -> list[int]:
    """One token for each row of ``logits`` (one row per request, in order): greedy rows by one
    argmax, the others after their penalties and grammar mask, at their temperature and top-p,
    seeded ones from their own generator; logprobs recorded for the rows that asked."""
    if all(r.plain_greedy() for r in reqs):
        # the common batch: argmax of every row in one kernel, one copy to the host (the
        # model's dtype converts exactly to float32: the same argmax, no float copy)
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    for i, r in enumerate(reqs):
        if r.reason is not None:              # ended by its last text: a token nobody reads
            continue
        presence = getattr(r.msg, "presence_penalty", 0.0)
        frequency = getattr(r.msg, "frequency_penalty", 0.0)
        if (presence or frequency) and r.tail.ids:
            _penalise(logits[i], r.tail.ids, presence, frequency)
        if r.constraint is not None:          # constrained rows: what the grammar allows
            r.constraint.fill_mask(logits[i])
    out = logits.argmax(dim=-1)
    rows = [i for i, r in enumerate(reqs) if r.msg.temperature > 0]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        temps = torch.tensor([reqs[i].msg.temperature for i in rows], device=dev)
        probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
        top_p = [reqs[i].msg.top_p for i in rows]
        if any(p < 1.0 for p in top_p):
            probs = _top_p(probs, torch.tensor(top_p, device=dev))
        free = [j for j, i in enumerate(rows) if reqs[i].msg.seed is None]
        if free:
            picks = torch.multinomial(probs[free], 1)[:, 0]
            out[idx[free]] = picks
        for j, i in enumerate(rows):
            req = reqs[i]
            if req.msg.seed is None:
                continue
            gen = req.generator
            if gen is None or gen.device.type != dev.type:
                gen = req.generator = _generator(dev, req.msg.seed)
            out[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    tokens = [int(t) for t in out.tolist()]
    for i, r in enumerate(reqs):              # only rows that asked for logprobs
        if r.logprobs is not None and r.reason is None:
            _record_logprobs(r, logits[i], tokens[i])
    return tokens


# ---- helpers ------------------------------------------------------------------------------------
def _penalise(row: torch.Tensor, ids: list[int], presence: float, frequency: float) -> None:
    """OpenAI's presence and frequency penalties on one row, from the tokens generated so
    far: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""
    tokens, counts = torch.unique(torch.tensor(ids, device=row.device), return_counts=True)
    keep = tokens < row.shape[0]
    tokens, counts = tokens[keep], counts[keep].to(row.dtype)
    row[tokens] -= counts * frequency + presence


def _record_logprobs(req: SeqRequest, row: torch.Tensor, token: int) -> None:
    """The sampled token's log-probability under the final distribution (penalised, masked,
    temperature-scaled) and the ``top_logprobs`` most likely tokens, appended to the
    request's list."""
    temp = req.msg.temperature
    lp = torch.log_softmax(row / temp if temp > 0 else row, dim=-1)
    k = int(getattr(req.msg, "top_logprobs", 0) or 0)
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, ids = lp.topk(min(k, lp.shape[0]))
        top = [(i, v) for i, v in zip(ids.tolist(), vals.tolist()) if v != float("-inf")]
    assert req.logprobs is not None
    req.logprobs.append((token, float(lp[token]), top))


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p          # mass of the tokens ranked higher
    sorted_p = sorted_p.masked_fill(before > top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
