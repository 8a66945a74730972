"""Every message type actors exchange, in one place.

Requests (from the HTTP layer to model actors) carry what the model needs and nothing else;
replies are plain data. Every message is a frozen, keyword-only dataclass: built once, with
named fields, and never changed on its way (a chat's :class:`TokenStream` and its ``cancel``
event are given at construction; the stream and the event change, the message does not).
Residency messages form the VRAM arbiter's protocol:

    model --RequestGrant--> arbiter          (may send Revoke to idle holders first)
    arbiter --Revoke--> holder               holder finishes its batch, drops GPU tensors,
    holder --Released--> arbiter             then the arbiter answers the asker:
    arbiter --(reply to RequestGrant)--> Granted
    model --Release--> arbiter               (idle_on_cpu, delete, device change)
    arbiter --Yield--> busy preemptible holder   (the LLM's batch loop pauses, then Releases
                                              and asks again)
    arbiter --Trim--> idle holder            drops its working memory (KV cache), keeps
    holder --Trimmed--> arbiter              its weights on the GPU
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.loop_calls import call_threadsafe
from .states import DeviceMode, FinishReason, ModelStatus

if TYPE_CHECKING:
    from ..runtime.liveconfig import ModelSpec

# ---- chat / completion -----------------------------------------------------------------------
class TokenStream:
    """Carries text pieces from the generating thread to the HTTP handler on the event loop.

    Items are ``str`` pieces; the stream ends with one terminal item: a :class:`ChatResult`
    or an exception. ``""`` is pushed once the prompt is accepted (so a handler can send
    headers then, and answer a bad prompt with a plain 4xx before that).
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[StreamItem] = asyncio.Queue()

    def push_threadsafe(self, item: StreamItem) -> None:
        call_threadsafe(self.loop, self.queue.put_nowait, item)

    def push(self, item: StreamItem) -> None:
        self.queue.put_nowait(item)

    async def get(self) -> StreamItem:
        return await self.queue.get()


@dataclass(frozen=True, kw_only=True)
class Chat:
    """Generate from chat ``messages`` (templated) or a raw ``prompt`` (legacy completions).
    ``stream``: where the text goes piece by piece as it is generated (None: the reply only);
    ``cancel``: set by the HTTP handler when the client goes away.

    Tools and structured output (actors/llm_tools.py, actors/llm_grammar.py): ``tools`` are
    OpenAI function definitions (``{name, description, parameters, strict}``); ``tool_choice``
    is ``auto`` (free text, a call is read out of it if one appears), ``none`` (tools not
    shown), ``required`` (decoding constrained to a call of one of them) or ``function``
    (constrained to a call of ``tool_name``). ``response_schema``: the JSON text of a schema
    the answer must follow (``'{"type": "object"}'`` for ``json_object``); unsupported schema
    keywords are an error when ``schema_strict``, else ignored.
    ``logprobs``: where the sampled tokens' ``(token_id, logprob, [(id, logprob), ...])`` go
    (the ``top_logprobs`` most likely alternatives), given at construction like ``stream``;
    None: not asked. Penalties as OpenAI defines them, on the tokens generated so far."""
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None    # None = what the context allows
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: TokenStream | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"        # auto | none | required | function
    tool_name: str | None = None     # tool_choice "function": which one
    parallel_tool_calls: bool = True
    response_schema: str | None = None
    schema_strict: bool = False
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True, kw_only=True)
class ChatResult:
    text: str
    finish_reason: FinishReason      # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        # a plain "stop" becomes FinishReason.STOP (the same string; an unknown one is a bug)
        object.__setattr__(self, "finish_reason", FinishReason(self.finish_reason))


#: What a :class:`TokenStream` carries: text pieces, then a result or an error.
StreamItem = str | ChatResult | BaseException


# ---- embeddings --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Embed:
    texts: list[str]
    dimensions: int | None = None


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    vectors: np.ndarray              # (len(texts), dim) float32, in input order
    prompt_tokens: int


# ---- rerank ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Rerank:
    query: str
    documents: list[str]


@dataclass(frozen=True, kw_only=True)
class RerankResult:
    scores: list[float]              # one per document, input order, each in [0, 1]
    tokens: int


# ---- status ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Describe:
    """Ask a model actor for its state (answered between batches)."""


@dataclass(frozen=True, kw_only=True)
class ModelState:
    name: str
    kind: str
    state: ModelStatus               # loading | ready | failed | stopped
    device: str                      # where the weights are now: a Device (cpu | cuda)
    config_device: DeviceMode        # flex | cuda | cpu (from liveconfigs.json)
    resident_bytes: int
    weight_bytes: int
    queue_length: int
    error: str | None = None
    gpu_mode: str | None = None      # on the GPU: resident | streamed (layer-streamed encoder)
    gpu: str | None = None           # on the GPU: the card of its grant (cuda:0, cuda:1, ...)


# ---- GPU residency (the VRAM arbiter's protocol) -----------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RequestGrant:
    """A model asks to hold ``nbytes`` of GPU memory (weights + working memory of its job).

    ``weights``: the part of ``nbytes`` that is costly to give back (the weights' GPU copy);
    the rest is working memory (KV cache, activations) that an idle holder drops cheaply on a
    :class:`Trim`. 0 means all of ``nbytes`` (nothing to trim). ``restore_s``: what bringing
    the weights back costs the holder, in seconds (its measured admit time, plus what else it
    loses, e.g. CUDA graphs); 0: the arbiter estimates it from the bytes. ``stream_bytes``:
    the GPU bytes of the holder's layer-streamed mode (an encoder's small parts plus a few
    layers' slots) that replaces ``weights`` in a streamed grant; 0: it cannot stream.
    ``stream_working``: the job's working memory when it runs streamed (as resident, two
    forwards in flight; a grant of less runs one, or smaller ones: EncoderActor._plan_groups;
    0: as resident); ``stream_s``: how much longer the job takes streamed than resident (the
    layers' copies the compute does not hide; more when the encoder measured its jobs of both
    modes further apart: EncoderActor.stream_extra_s). ``trim_s``: what giving back the
    working memory costs the holder when its next job comes (an LLM captures its CUDA graphs
    again); 0: next to nothing."""
    model: str
    nbytes: int
    priority: int = 1                 # lower = more urgent
    pinned: bool = False              # device: cuda models hold a permanent grant
    device: str | None = None         # the card it must be on (cuda:N); None: the arbiter places it
    preemptible: bool = False         # its job can pause on a Yield (the LLM's batch loop)
    weights: int = 0
    restore_s: float = 0.0
    stream_bytes: int = 0
    stream_working: int = 0
    stream_working_min: int = 0       # the least it can stream with (smaller forwards); 0: as above
    stream_s: float = 0.0
    trim_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Granted:
    model: str
    nbytes: int
    waited_s: float = 0.0
    evicted: tuple[str, ...] = ()
    streamed: bool = False            # run the job layer-streamed (stream_bytes, not weights)
    device: str = "cuda:0"            # the card the grant is on: admit the weights there


@dataclass(frozen=True, kw_only=True)
class Revoke:
    """The arbiter asks a holder to give its GPU memory back (after its current batch)."""
    model: str
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class FinishJob:
    """The arbiter asks a busy holder whose job ends on its own (an encoder's batch) to take
    no more requests into that job: another model waits for its memory. Its arrival in the
    mailbox closes the running job (a message of another kind ends it); the job finishes
    what it took in, answers JobFinished, and the requests that came after start a new job,
    which asks for the GPU again behind the waiter. Handled afterwards, it does nothing."""
    model: str
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Yield:
    """The arbiter asks a busy, preemptible holder (the LLM's batch loop, which would otherwise
    hold the GPU as long as chats keep coming) to pause its job soon and give its memory back:
    another model waits for it. The holder resumes by asking again, in the queue.
    ``keep_weights``: its working memory (the KV cache) is enough for the waiter: the holder
    drops only that and keeps its weights on the GPU (answering JobFinished, then Trimmed),
    instead of giving everything back."""
    model: str
    reason: str = ""
    keep_weights: bool = False


@dataclass(frozen=True, kw_only=True)
class Trim:
    """The arbiter asks an idle holder to drop its working memory (KV cache, activations) and
    keep its weights on the GPU; the holder answers :class:`Trimmed`."""
    model: str
    keep: int                         # the bytes the holder keeps (its weights)
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Trimmed:
    """A holder tells the arbiter what it holds after a :class:`Trim` (a busy holder keeps
    everything and says so)."""
    model: str
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class Released:
    """A holder tells the arbiter its GPU tensors are gone."""
    model: str
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class Release:
    """A holder gives its grant back on its own (idle_on_cpu, delete, device change)."""
    model: str


@dataclass(frozen=True, kw_only=True)
class JobStarted:
    """A holder started a batch on the GPU: the arbiter must not evict it until JobFinished."""
    model: str


@dataclass(frozen=True, kw_only=True)
class JobFinished:
    model: str


@dataclass(frozen=True, kw_only=True)
class ArbiterState:
    """Reply to Describe sent to the arbiter."""
    budget: int
    used: int
    holders: dict[str, int]
    busy: tuple[str, ...]
    waiting: tuple[str, ...]
    #: per card: {"budget", "used", "free", "peak"} bytes (one entry on a one-GPU server)
    devices: dict[str, dict[str, int]] = field(default_factory=dict)
    placement: dict[str, str] = field(default_factory=dict)   # holder -> its card


@dataclass(frozen=True, kw_only=True)
class RevokeAllFlex:
    """reset_flags: revoke every flex grant and fail stuck waits."""
    reason: str = "reset_flags changed"


# ---- live configuration ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class UpdateModel:
    """New settings for a running model that need no reload (device, cuda_thres, idle_on_cpu,
    max_tokens, the kind's *_params)."""
    spec: ModelSpec
    params: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Drain:
    """Answered once every message queued before it has been handled (used before a stop)."""


@dataclass(frozen=True, kw_only=True)
class EditConfig:
    """Change liveconfigs.json (the single source of truth) and apply it: ``edit`` mutates the
    file's parsed object in place; the result is validated before anything is written."""
    edit: Callable[[dict[str, Any]], None]
    why: str = ""


@dataclass(frozen=True, kw_only=True)
class ReloadConfig:
    """Ask the config actor to re-read liveconfigs.json now; the reply lists what changed."""
    force: bool = True
