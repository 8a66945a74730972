"""The named states the actors report: enums whose members *are* the strings the HTTP layer,
/health, /metrics and liveconfigs.json have always used.

Each enum is a ``str`` subclass, so a member compares, hashes, formats and serialises (orjson,
json) and prints exactly as its value: ``FinishReason.STOP == "stop"``, and
``f"{FinishReason.STOP}"`` is ``"stop"``. Python 3.10 has no ``enum.StrEnum``, hence
:class:`StrEnum` here.

A leaf module (no imports from the package), so ``runtime/`` may use it too.
"""
from __future__ import annotations

from enum import Enum


class StrEnum(str, Enum):
    """A ``str`` enum whose ``str()``, ``format()`` and ``repr()`` are its value's: whatever
    printed the plain string before (events such as ``device='cpu'``, logs) prints the same."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    def __repr__(self) -> str:
        return str.__repr__(self)


class FinishReason(StrEnum):
    """Why a generation ended: the OpenAI ``finish_reason`` strings (plus ours)."""
    STOP = "stop"               # end-of-sequence token or a stop string
    LENGTH = "length"           # max_tokens or the context ran out
    CANCELLED = "cancelled"     # the client went away / the request was cancelled
    ERROR = "error"             # the model failed on it (the asker gets the error, not a result)


class ModelStatus(StrEnum):
    """A model actor's lifecycle (``ModelState.state``, /health's ``state``)."""
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Device(StrEnum):
    """Where a model's weights are now (``ModelState.device``)."""
    CPU = "cpu"
    CUDA = "cuda"


class DeviceMode(StrEnum):
    """An entry's ``device`` in liveconfigs.json: where it may run."""
    FLEX = "flex"               # on the CPU, lent the GPU by the arbiter for big jobs
    CUDA = "cuda"               # a permanent (pinned) GPU grant
    CPU = "cpu"                 # never asks for the GPU
