"""Forwards run layer-major through one LayerStream: each layer copied once for a group (issue 13).

A layer-streamed encoder copies every layer from host memory once per pass. A job split into
many small forwards (a small working grant, many concurrent requests) would copy the whole model
once per forward. Run as a *group*, the forwards share each copy: every member runs layer 0,
then every member runs layer 1, and so on. All on the calling thread, in three phases, using only
the module's own code:

1. **capture**: each member's forward runs up to its first block; the block's pre-hook records
   the arguments the model passes it (the hidden states, the attention mask, ...) and stops
   the forward there (:class:`_Captured`). The embeddings and the mask are the model's own.
2. **layers**: for each layer, its weights made ready in a slot once; then each member's hidden
   states go through it (the block called with the member's captured arguments, its hidden
   states replaced by the previous block's output).
3. **replay**: each member's forward runs again with every block replaced by one that returns
   that member's last block output, so the model's own tail (pooler, classifier head, sentence-
   transformers' pooling and normalisation) makes the member's result.

This assumes the model calls its blocks one after another with the same arguments except the
hidden states (true of BERT, RoBERTa, XLM-R and their kin). It is checked on the first group a
stream runs: the first member's result is compared with a plain pass of the same forward; if
they differ, the stream runs later groups as plain passes (logged once).

Between layers each member holds only its hidden states and mask (a few KB a token), and the
members' layers run one after another on one stream: the working memory is one member's forward
plus every member's hidden states. No thread switches: the members' kernels are launched back to
back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer_stream import LayerStream

__all__ = ["run_layer_major", "one_by_one"]

log = logging.getLogger(__name__)

# tolerance of the first group's check: the same kernels on the same weights, usually identical
CHECK_RTOL = CHECK_ATOL = 2e-3


class _Captured(Exception):
    """Raised by the first block's pre-hook in the capture phase: the forward stops there."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("captured")
        self.args = args
        self.kwargs = kwargs
        # the forward's autograd modes, for its layers run outside it
        self.modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _first(out: Any) -> torch.Tensor:
    """A block's output as the next block's hidden states (a tensor, or its first element)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    got = getattr(out, "last_hidden_state", None)
    if got is None:
        got = out[0]
    return got


class _Replay:
    """Instance forwards for every block in the replay phase: return the member's last block
    output, whatever the block is given."""

    def __init__(self, blocks: Any):
        self.blocks = blocks
        self.out: Any = None

    def __enter__(self) -> _Replay:
        for b in self.blocks:
            b.forward = self._forward
        return self

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out

    def __exit__(self, *exc: Any) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)


def run_layer_major(stream: LayerStream, fns: list[Callable[[], Any]]) -> list[Any]:
    """The three phases (module docstring) for ``fns``, on the calling thread, which holds the
    stream's pass lock and is its group thread (the stream's hooks stand aside for it).
    Returns each fn's result or the exception it raised."""
    n = len(fns)
    out: list[Any] = [None] * n
    captured: dict[int, tuple[tuple, dict]] = {}
    modes: dict[int, tuple[bool, bool]] = {}
    # 1. capture: the model's own code up to the first block
    stream._group_mode = "capture"
    for k, fn in enumerate(fns):
        try:
            out[k] = fn()                    # returned without reaching a block: its result
        except _Captured as cap:
            captured[k] = (cap.args, cap.kwargs)
            modes[k] = cap.modes
        except Exception as exc:  # noqa: BLE001 - that member's own failure
            out[k] = exc
    # 2. layers: each layer made ready once, every member through it
    stream._group_mode = "layers"
    last: dict[int, Any] = {}
    if captured:
        stream._start_copies()
        for i, block in enumerate(stream.blocks):
            stream._begin_layer(i)
            for k in list(captured):
                args, kwargs = captured[k]
                inference, grad = modes[k]
                try:
                    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                        got = block(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - that member's own failure
                    out[k] = exc
                    del captured[k]
                    continue
                if i == len(stream.blocks) - 1:
                    last[k] = got
                    del captured[k]
                else:
                    captured[k] = _with_hidden(args, kwargs, _first(got))
            stream._end_layer(i)
    # 3. replay: the model's own tail on each member's last block output
    stream._group_mode = "replay"
    with _Replay(stream.blocks) as replay:
        for k, got in last.items():
            replay.out = got
            try:
                out[k] = fns[k]()
            except Exception as exc:  # noqa: BLE001
                out[k] = exc
    return out


def one_by_one(fns: list[Callable[[], Any]]) -> list[Any]:
    """The fns run one after another (plain passes): each one's result, or the exception it
    raised."""
    out: list[Any] = []
    for fn in fns:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - that forward's own failure
            out.append(exc)
    return out


def same_result(a: Any, b: Any) -> bool:
    """Whether a grouped member's result matches a plain pass's (tensors within tolerance;
    anything else: equal)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.allclose(a.float(), b.float(), rtol=CHECK_RTOL, atol=CHECK_ATOL))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_result(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_result(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False
