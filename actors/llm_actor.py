"""The LLM actor: transformers causal LMs (GGUF files or HF folders), chat templates, streaming.

Chats are continuously batched (actors/llm_batching.py): ``serve`` hands the request to the batch
engine and returns ``DEFER``; the engine's loop runs in the actor's own thread while there is work,
encodes each prompt as it arrives (or takes it from the actor's prompt threads, which began
encoding it when ``serve`` took the chat in: actors/early_prompts.py), pushes each request's text
to its :class:`TokenStream` and answers it when it ends (EOS, stop string, max_tokens, client
gone). So the mailbox stays open during generation (Describe, more chats joining the running
batch). The GPU grant is taken before the loop starts and finished when it goes idle
(``BatchIdle``); the KV cache and CUDA graphs are freed before the weights are evicted. Models the
loop cannot drive (sliding windows, unusual architectures), or ``continuous_batching: false``, take
the generate path: one ``generate`` per request, streaming through the same text code. An engine
replaced by a live edit hands the chats it had not answered to its successor (or to the generate
path), and the actor's queue length counts them until they are answered.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runtime.actor import CONTROL, DEFER, Envelope
from ..runtime.errors import ActorStopped, InvalidRequest, ModelFailed, Overloaded, ServiceError
from ..runtime.loop_calls import call_threadsafe
from ..runtime.thread_tuner import ThreadTuner
from . import llm_grammar, llm_quant, llm_tools
from .early_prompts import MAX_THREADS, EarlyPrompts, auto_threads, prepared
from .llm_batching import BatchEngine, SeqRequest, TextTail, batching_supported
from .llm_fused import lay_end_to_end
from .llm_generate import eos_ids, generate
from .llm_int4 import gguf_four_bit, quantize_int4
from .llm_int8 import quantize_int8
from .llm_loading import free_idle_cache, gguf_location, llm_dtype, load_gguf, weight_quant
from .messages import Chat, ChatResult, Revoke, UpdateModel, Yield
from .model_base import ModelActor
from .prefill_graphs import GRAPH_TOKENS
from .prompt_tokens import text_ids
from .torch_util import is_oom, module_bytes

log = logging.getLogger("agile_rag.llm")

#: While chats keep the LLM busy on a shared GPU, a waiting model makes them pause only after
#: they have run this many times what a pause costs them (the GPU given back and taken again,
#: graphs, the text re-read; measured): pausing then takes at most 1/7 of their GPU time.
YIELD_COST_RATIO = 6.0


@dataclass
class BatchIdle:
    """The batch loop went idle (sent by the actor to itself when the loop's thread returns)."""
    loop: Any = None
    stats: dict = field(default_factory=dict)


class LLMActor(ModelActor):
    kind = "llm"

    def __init__(self, spec, params=None, *, cache_dir: str | None = None, **kw):
        super().__init__(spec, params, **kw)
        self.cache_dir = cache_dir
        self.model: Any = None
        self.tokenizer: Any = None
        self.context_length = 2048
        self.engine: BatchEngine | None = None     # None: one generate() per request
        self.batching_off: str | None = None        # why the engine is off
        self._loop: asyncio.Future | None = None    # the running batch loop
        self._loop_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._holding = False           # a quiesce waits for the loop: do not restart it
        self._yield_keep = False        # a Yield asked for the cache only (answer Trimmed)
        self._unanswered = 0            # chats handed to the engine and not answered yet
        self._handed: dict[int, SeqRequest] = {}   # id(Chat) -> its state, from an old engine
        self.warm_chats_s: float | None = None      # what the warm-up chats at load took
        self._prompts: EarlyPrompts | None = None   # the prompt threads (prompt_threads)

    # ---- loading ---------------------------------------------------------------------------
    def load_blocking(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = self.spec
        common = {"trust_remote_code": spec.trust_remote_code}
        gguf = gguf_location(spec.path)
        quant = llm_quant.quant_method(spec.path) if gguf is None else None
        # the entry's dtype, else bfloat16 where the CPU computes it (llm_loading.llm_dtype);
        # a GGUF load takes it after dequantising (passed in, it drops a tied lm_head)
        cpu_only = self.residency_factory is None or spec.device == "cpu"
        chosen = spec.dtype if quant else llm_dtype(spec.dtype, gguf=gguf is not None,
                                                    cpu_only=cpu_only)
        dtype = {"dtype": _dtype(chosen)} if chosen else {}
        if quant is not None:       # GPTQ / AWQ: the portable kernel, safe to move (llm_quant)
            model = llm_quant.load_quantized(spec.path, quant, dtype=dtype.get("dtype"), **common)
            self.residency_factory = llm_quant.residency_factory(self.residency_factory, model)
        elif gguf is None:
            model = AutoModelForCausalLM.from_pretrained(spec.path, **dtype, **common)
        else:
            model = load_gguf(self.name, self.cache_dir, *gguf, dtype=dtype, common=common)
        tok_gguf = gguf_location(spec.tokenizer_path)
        cached = getattr(model, "_agile_cached_dir", None)
        if cached and spec.tokenizer_path == spec.path:
            tokenizer = AutoTokenizer.from_pretrained(cached, **common)
        elif tok_gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(tok_gguf[0], gguf_file=tok_gguf[1], **common)
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path, **common)
        model.eval()
        mode = weight_quant(self.params, entry_dtype=spec.dtype, gguf=gguf is not None,
                            cpu_only=cpu_only)
        if quant is None and mode != "none":
            n4 = 0
            if mode == "int4":                  # every decoder layer that fits
                n4 = quantize_int4(model)
            elif mode == "file" and gguf is not None:   # those the file keeps in 4 bits
                n4 = quantize_int4(model, only=gguf_four_bit(os.path.join(*gguf)))
            n8 = quantize_int8(model, model.get_input_embeddings().weight.dtype)
            log.info("%s: %d linear layers as int4 weights, %d as int8 (llm_params.weight_quant "
                     "%s)", self.name, n4, n8, self.params.get("weight_quant", "auto"))
        if not cpu_only and self.params.get("gpu_lean_decode", True) is not False and \
                torch.cuda.is_available():
            # before the weights' residency adopts them: it keeps the shared storages
            log.info("%s: %d projection groups laid end to end (llm_params.gpu_lean_decode)",
                     self.name, lay_end_to_end(model))
        self.model, self.tokenizer = model, tokenizer
        self.weight_bytes = module_bytes(model)
        self.model_limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(spec.max_tokens or self.model_limit, self.model_limit)
        self._make_engine()

    # ---- batching settings (llm_params, all optional) ------------------------------------------
    #   continuous_batching (true)  false: one generate() at a time, the old path
    #   max_batch_size (32)         sequences decoding together
    #   batch_kv_tokens (16384)     KV cache budget of the batch in tokens (at least one context);
    #                               the GPU grant counts it
    #   cuda_graphs (true)          capture the decode step as CUDA graphs on the GPU
    #   lean_decode (true)          on the CPU, Llama-family models decode through a lean step
    #                               (actors/llm_lean_decode.py), checked against transformers'
    #   gpu_min_slice_ms (500)      when another model waits for the GPU, the batch pauses
    #                               (and gives the GPU back) once it has run this long; unset,
    #                               also not before YIELD_COST_RATIO times what its last
    #                               pauses cost (at most 5 s)
    #   prefill_chunk_tokens (512 on a CPU, 2048 on a GPU)  a longer prompt is prefilled
    #                               this many tokens at a time, the other chats decoding
    #                               between chunks (0: all at once); while chats stream, new
    #                               prompts are read at most this many tokens a pass (unset
    #                               on a GPU: up to prefill_batch_tokens)
    #   prefill_batch_tokens (4096) the most prompt tokens one prefill pass reads with
    #                               nobody streaming (a burst's first prompts); counted in
    #                               the GPU grant (the pass's activations)
    #   kv_block_tokens (0)         0: the KV cache is one rectangle (rows x the longest
    #                               reservation); 16, 32...: blocks of this many tokens, each
    #                               chat holding the blocks its tokens fill (a new engine)
    #   prefix_cache_tokens (4096)  prompts' leading 16-token blocks kept for reuse by the
    #                               next prompts that start the same way (0: off); counted in
    #                               the GPU grant
    #   own_stream (true)           on a GPU, the batch loop computes on a CUDA stream of its
    #                               own, beside the encoders' default stream (not after it)
    #   gpu_lean_decode (true)      on a GPU, the decode graphs capture the lean step
    #                               (actors/llm_lean_decode.py; q/k/v and gate/up laid end to
    #                               end at load, actors/llm_fused.py) if it agrees with
    #                               transformers' step
    #   chunk_graphs (true)         on a GPU, a short last chunk of a prompt (the question after
    #                               a stored prefix) replays a CUDA graph of the lean chunk
    #                               straight into its slot (actors/chunk_graphs.py); off by
    #                               itself for flex + idle_on_cpu, as warm_graphs
    #   prefill_graphs (true)       on a GPU, a lean prefill pass of 1-4 short prompts (up to
    #                               1,024 tokens in all) replays a CUDA graph captured while
    #                               idle (actors/prefill_graphs.py); off by itself for flex +
    #                               idle_on_cpu, as warm_graphs
    #   decode_ahead (true)         on a GPU, a greedy decode step starts from the last
    #                               step's tokens still on the device, read while it computes
    #                               (actors/llm_batching.py)
    #   decode_cudnn_attention      on a GPU, the decode graphs are captured with cuDNN's
    #   (true)                      attention kernels allowed (first): plans are built once,
    #                               at capture, never on the request path
    #   prompt_threads (auto)       threads that encode a chat's prompt as the actor takes it
    #                               in, before the batch loop reaches it (actors/
    #                               early_prompts.py); auto: on a GPU one per 4 cores up to
    #                               4, none below 8 cores or on a CPU-only LLM; 0: the loop
    #                               encodes them
    #   lean_prefill (true)         a burst's prompts are read in one right-padded pass by
    #                               the decode step's lean decoder (where one is in use and
    #                               its prefill agreed with transformers' once)
    #   wait_for_prompts (false)    the loop waits for a prompt still being encoded on a
    #                               prompt thread even with other work to do (a pass to
    #                               launch, rows to decode); false: it goes on, takes it later
    #   burst_prefill (true)        a burst's prefill passes go back to back, no decode step
    #                               between them, while no chat in the batch has decoded yet
    #                               (actors/llm_batching.py _next_pass_first)
    #   decode_rope_kv (true)       on a GPU with Triton, the lean decode step rotates q and
    #                               k and writes the new keys and values in one kernel a
    #                               layer (actors/llm_rope_kv.py), where three ran
    #   warm_graphs (true)          after a load or an admit, capture the common decode graphs
    #                               while idle (off by itself for flex + idle_on_cpu: the
    #                               weights leave as soon as the batch is idle)
    def _batch_settings(self) -> dict:
        p = self.params
        slice_ms = p.get("gpu_min_slice_ms")
        chunk = p.get("prefill_chunk_tokens")
        leaves_when_idle = bool(self.spec.idle_on_cpu) and self.spec.device == "flex"
        return {"max_batch": _pos_int(p.get("max_batch_size"), 32),
                "kv_tokens": max(self.context_length, _pos_int(p.get("batch_kv_tokens"), 16384)),
                "prefill_tokens": _pos_int(p.get("prefill_batch_tokens"), 4096),
                "cuda_graphs": p.get("cuda_graphs", True) is not False,
                "lean_decode": p.get("lean_decode", True) is not False,
                "own_stream": p.get("own_stream", True) is not False,
                "gpu_lean": p.get("gpu_lean_decode", True) is not False,
                "chunk_graphs": p.get("chunk_graphs", True) is not False and
                not leaves_when_idle,
                "prefill_graphs": p.get("prefill_graphs", True) is not False and
                not leaves_when_idle,
                "decode_ahead": p.get("decode_ahead", True) is not False,
                "decode_cudnn": p.get("decode_cudnn_attention", True) is not False,
                "lean_prefill": p.get("lean_prefill", True) is not False,
                "wait_prompts": p.get("wait_for_prompts", False) is True,
                "burst_passes": p.get("burst_prefill", True) is not False,
                "decode_rope_kv": p.get("decode_rope_kv", True) is not False,
                "warm_graphs": p.get("warm_graphs", True) is not False and not leaves_when_idle,
                "prefix_cache_tokens": _nonneg_int(p.get("prefix_cache_tokens"), 4096),
                "kv_block": _nonneg_int(p.get("kv_block_tokens"), 0),
                "min_slice_s": (500 if slice_ms is None else max(0, slice_ms)) / 1000,
                "slice_cost_ratio": YIELD_COST_RATIO if slice_ms is None else 0.0,
                "prefill_chunk": None if chunk is None else max(0, chunk)}

    def _batching_off_reason(self, params: dict) -> str | None:
        why = batching_supported(self.model)
        if why is None and params.get("continuous_batching", True) is False:
            why = "llm_params.continuous_batching is false"
        return why

    def _make_engine(self) -> None:
        """A new engine (or none: the generate path) for the current settings. Requests the
        old engine had not answered go to the new one, or back to the mailbox for the
        generate path: an engine replaced for any reason loses nobody (call it only while no
        batch loop runs)."""
        old, self.engine = self.engine, None
        leftovers = old.take_unanswered() if old is not None else []
        if old is not None:
            old.close()
        why = self._batching_off_reason(self.params)
        if why is not None:
            if self.batching_off != why:
                log.info("%s: continuous batching off (%s): one generate() at a time",
                         self.name, why)
            self.batching_off = why
            for req in leftovers:               # served one by one, where they left off
                self._handed[id(req.msg)] = req
                env = req.owner
                env.detail.pop("deferred", None)
                self._unanswered -= 1
                self.mailbox.put_nowait(env)
            return
        self.batching_off = None
        self.engine = BatchEngine(self.model, self.tokenizer, prepare=self._prepare,
                                  accepted=self._go_ahead, **self._batch_settings())
        threads = self.cpu_thread_range()
        if threads:                     # TORCH_THREADS auto: CPU decode steps time both counts
            self.engine.runner.tuner = ThreadTuner(*threads)
        self.engine.adopt(leftovers)

    def working_bytes(self, items: int) -> int:
        """The KV cache (the batch's token budget, or one whole context without batching),
        prefill activations, the prefill graphs' memory pool (``prefill_graphs``: one pass of
        up to :data:`~.prefill_graphs.GRAPH_TOKENS` tokens, held while the graphs live), and a
        margin."""
        cfg = self.model.config
        layers = getattr(cfg, "num_hidden_layers", 24)
        heads = getattr(cfg, "num_attention_heads", 16)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        size = next(self.model.parameters()).element_size()
        per_token = 2 * layers * kv * head_dim * size
        if self.engine is None:
            return per_token * self.context_length + 128 * 2**20
        inter = getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
        # a forward never reads more tokens than the KV budget holds
        forward = min(self.engine.prefill_tokens, self.engine.kv_tokens)
        per_token_act = (3 * inter + 4 * cfg.hidden_size) * size
        act = forward * per_token_act
        settings = self.engine.settings
        prefixes = per_token * settings.prefix_cache_tokens   # kv_prefix.py
        # (graphs only on a CUDA card: not for a GPU simulated on the CPU, tests/
        # test_simulated_gpu.py)
        graphed = settings.prefill_graphs and settings.cuda_graphs and \
            str(self.gpu_device).startswith("cuda")
        graphs = GRAPH_TOKENS * per_token_act if graphed else 0
        return per_token * self.engine.kv_tokens + prefixes + act + graphs + 128 * 2**20

    def _engine_changes(self, params: dict) -> bool:
        """Would these params turn continuous batching on or off, or change the KV cache's
        layout (a rectangle or blocks: a new engine)?"""
        if self.model is None:
            return False
        if (self._batching_off_reason(params) is None) != (self.engine is not None):
            return True
        return self.engine is not None and \
            self.engine.settings.kv_block != _nonneg_int(params.get("kv_block_tokens"), 0)

    def update(self, spec, params) -> bool:
        super().update(spec, params)
        if self.model is not None:
            self.context_length = min(spec.max_tokens or self.model_limit, self.model_limit)
            if self._engine_changes(params):
                self._make_engine()            # batching turned on or off (no loop runs)
            elif self.engine is not None:
                self.engine.configure(**self._batch_settings())   # between two steps
        return True

    def queue_length(self) -> int:
        """Everything not answered yet: the mailbox and the chats in the engine alike."""
        return super().queue_length() + self._unanswered

    def unload_blocking(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.model = None
        self.tokenizer = None

    async def _attach_gpu(self) -> None:
        """After the weights went to the GPU at load (``device: cuda``), one loop with no
        request warms the decode graphs before the model says it is ready."""
        await super()._attach_gpu()
        eng = self.engine
        if eng is None or not self._warm_due():
            return
        await self._run_loop_once("warming the decode graphs")
        log.info("%s: decode graphs warmed: %s", self.name, eng.runner.last_warm)
        if eng.runner.device.type == "cuda":       # (_warm_due: warm_graphs is on)
            await self._warm_chats()

    async def _run_loop_once(self, what: str) -> None:
        """Start a batch loop for what the engine holds now and wait until it is over."""
        await self._start_loop(None)
        loop = self._loop
        assert loop is not None
        try:
            await asyncio.shield(loop)
        except Exception:  # noqa: BLE001 - a failed warm-up: its costs come on first use
            log.warning("%s: %s failed", self.name, what, exc_info=True)
        await self._loop_ended(None)

    async def _warm_chats(self) -> None:
        """(at load, on a CUDA device; no loop runs) Throwaway chats down the path a first
        burst takes: the chat template and the tokenizer, two prompts of different lengths
        admitted together (a padded prefill written into the KV cache), greedy and sampled
        tokens, the text; then a prompt that starts from the prefix they left; then eight
        prompts of a few hundred tokens at once (a burst's batch shapes). A process
        pays once for each first use (the template's compile, kernels loaded at their first
        launch, sampling's kernels, allocator segments): without this the first burst after
        start paid it on its requests (issue 15: 0.27 s to the first token against 0.12 s
        warm, after the graphs' and the prefills' warm-ups). Nobody is answered, nothing is
        counted, and the prefixes they left are dropped."""
        eng = self.engine
        assert eng is not None and self._loop is None
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        shared = "Warm-up: these words only take the path the first chats take. " * 2
        pair = [(shared + "Say one word.", 0.0), ("Say two words, please.", 0.7)]
        from_prefix = [(shared + "Say three words.", 0.0)]
        # a burst's shape: eight prompts of a few hundred tokens admitted together
        burst = [(f"({i}) " + "Passage words to read before a question. " * (18 + 3 * i)
                  + "Which words?", 0.0) for i in range(8)]
        try:
            for chats in (pair, from_prefix, burst):
                if chats is burst:        # read as after start: nothing stored yet
                    eng.runner.prefixes.clear()
                done = []
                for text, temperature in chats:
                    fut = loop.create_future()
                    msg = Chat(messages=[{"role": "user", "content": text}], max_tokens=3,
                               temperature=temperature, top_p=0.9)
                    eng.submit(SeqRequest(msg, None, 0, _answer_to(loop, fut),
                                          TextTail(self.tokenizer, [], None)))
                    done.append(fut)
                await self._run_loop_once("the warm-up chats")
                for res in await asyncio.wait_for(asyncio.gather(*done), 60):
                    if isinstance(res, BaseException):
                        raise res
        except Exception as exc:  # noqa: BLE001 - a warm-up only: the first chats pay instead
            log.warning("%s: the warm-up chats failed (%r): the first chats pay its costs",
                        self.name, exc)
        else:
            self.warm_chats_s = round(time.monotonic() - t0, 4)
            log.info("%s: warm-up chats in %.3f s", self.name, self.warm_chats_s)
        finally:
            eng.runner.prefixes.clear()

    def _warm_due(self) -> bool:
        """The weights are on the GPU, no loop runs and the decode graphs are not captured:
        a loop with no request would warm them (requests that come meanwhile join it)."""
        eng = self.engine
        return eng is not None and self._loop is None and self.lease is not None and \
            self.lease.on_gpu and eng.settings.warm_graphs and eng.runner.graphs_wanted() and \
            eng.runner.graphs is None

    # ---- messages ---------------------------------------------------------------------------
    async def on_start(self) -> None:
        # the batch loop's own thread, started first (the graphs' warm-up at load runs in
        # it): a long batch never holds a worker of the shared model pool (embedders and
        # rerankers keep all of theirs)
        self._loop_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"llm-batch-{self.name}")
        self._loop_thread.submit(lambda: None)
        await super().on_start()

    async def handle(self, msg: Any, env: Envelope) -> Any:
        if isinstance(msg, BatchIdle):
            return await self._batch_idle(msg, env)
        if isinstance(msg, Yield):          # another model waits for the GPU the batch holds
            asked = self.engine is not None and self.lease is not None and \
                self.lease.busy and self.engine.request_yield()
            env.detail["pausing"] = bool(asked)
            if msg.keep_weights:             # the arbiter waits for our Trimmed
                if self._loop is None and self.lease is not None and not self.lease.busy:
                    await self.trim_working(env)         # no job: the cache goes now
                else:
                    self._yield_keep = True              # at the end of the loop
            return None
        if isinstance(msg, Revoke) or (isinstance(msg, UpdateModel) and (
                msg.spec.placement != self.spec.placement or self._engine_changes(msg.params))):
            # the weights may move, or the engine is replaced: no batch, no KV cache
            await self._quiesce(env)
            result = await super().handle(msg, env)
            if self.engine is not None and self._loop is None and self.engine.pending:
                await self._start_loop(env)              # requests the quiesce held back
            elif self._warm_due():
                await self._start_loop(env)   # pinned again (cpu -> cuda): warm the graphs
            return result
        return await super().handle(msg, env)

    async def serve(self, msg: Any, env: Envelope) -> Any:
        if not isinstance(msg, Chat):
            raise TypeError(f"LLM actor cannot handle {type(msg).__name__}")
        req = self._handed.pop(id(msg), None)
        if self.engine is None:
            if req is None:
                req = SeqRequest(msg, None, 0, _no_callback,
                                 TextTail(self.tokenizer, msg.stop, msg.stream), owner=env)
            result = await self.compute(1, env, self._generate, req)
            env.detail.update(prompt_tokens=result.prompt_tokens,
                              completion_tokens=result.completion_tokens, batch_size=1)
            return result
        loop = asyncio.get_running_loop()
        if req is None:
            req = SeqRequest(msg, None, 0, _no_callback,
                             TextTail(self.tokenizer, msg.stop, msg.stream), owner=env)
        # through call_threadsafe: after the text pieces the same step held (runtime/loop_calls)
        req.on_done = lambda r, res: call_threadsafe(
            loop, lambda a: self._seq_done(*a), (env, r, res))
        self._unanswered += 1
        prompts = self._early_prompts()
        if prompts is not None:           # encoded while the burst is taken in, the grant asked
            prompts.start(req)
        if not self.engine.submit(req):               # no loop runs: take the GPU, start one
            await self._start_loop(env)
        return DEFER

    def _early_prompts(self) -> EarlyPrompts | None:
        """The prompt threads ``llm_params.prompt_threads`` asks for now (made, resized or
        closed here), or None: the loop encodes the prompts."""
        v = self.params.get("prompt_threads", "auto")
        if v == "auto" or not isinstance(v, int) or isinstance(v, bool):
            n = auto_threads(self.spec.device != "cpu" and torch.cuda.is_available())
        else:
            n = max(0, min(v, MAX_THREADS))
        cur = self._prompts
        if cur is not None and cur.threads == n:
            return cur
        if n:
            # threads only for a Rust tokenizer (it encodes without the GIL) with no
            # truncation or padding set: the first encode clears those, a write that no
            # other thread's encode may overlap ("Already borrowed"); the loop's first
            # prompt does it
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None or backend.truncation is not None or \
                    backend.padding is not None:
                return cur
        if cur is not None:
            cur.close()
        self._prompts = EarlyPrompts(self._prepare, n, self.name) if n else None
        return self._prompts

    def _prepare(self, req: SeqRequest) -> None:
        """(the batch loop's thread, or a prompt thread: actors/early_prompts.py) Encode and
        check the prompt; raising answers the chat."""
        req.prompt = self.encode_prompt(req.msg) or self._empty_prompt()
        req.max_new = self._max_new(len(req.prompt), req.msg)
        req.constraint = llm_grammar.constraint_for(self.tokenizer, req.msg,
                                                    eos_ids(self.model, self.tokenizer))
        req.logprobs = req.msg.logprobs

    @staticmethod
    def _go_ahead(req: SeqRequest) -> None:
        """The prompt is accepted: a stream's headers may go out (from the batch loop as it
        takes the prompt in, in its turn's one wake-up of the event loop, not one wake-up per
        prompt from the prompt threads while the event loop takes a burst in)."""
        if req.msg.stream is not None:
            req.msg.stream.push_threadsafe("")

    def _empty_prompt(self) -> list[int]:
        """What an empty completions prompt (``"prompt": ""``, no tokens) starts from: the
        text's first token, as OpenAI's legacy completions start such a prompt from
        <|endoftext|>: the tokenizer's BOS, else its EOS."""
        for tid in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if isinstance(tid, int):
                return [tid]
        raise InvalidRequest("The prompt is empty and this model's tokenizer has no token to "
                             "start a text from; send some text.", param="prompt")

    def _max_new(self, n_prompt: int, msg: Chat) -> int:
        room = self.context_length - n_prompt
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"prompt has {n_prompt} tokens. Shorten the messages.",
                param="messages", code="context_length_exceeded")
        return room if msg.max_tokens is None else min(msg.max_tokens, room)

    async def _start_loop(self, env: Envelope | None) -> None:
        if self.lease is not None and not self.lease.busy:    # else the last loop's grant holds
            self.device = await self.lease.acquire(1, self.working_bytes(1), env,
                                                   preemptible=True)
        engine = self.engine
        assert engine is not None
        engine.start()
        if self._loop_thread is None:            # (never started through on_start)
            self._loop_thread = concurrent.futures.ThreadPoolExecutor(1)
        run = self.lease.bound(engine.run) if self.lease is not None else engine.run   # its card
        # counted as model work: no heap trim or freeze while the batch runs (runtime.heap)
        fut = self.system.executor.run_in(self._loop_thread, run)
        self._loop = fut
        fut.add_done_callback(self._loop_done)

    def _loop_done(self, fut: asyncio.Future) -> None:
        stats = {} if fut.cancelled() or fut.exception() is not None else dict(fut.result())
        if not fut.cancelled() and fut.exception() is not None:
            stats["error"] = repr(fut.exception())[:300]
        self.tell(BatchIdle(fut, stats), priority=CONTROL, sender=self.name)

    async def _batch_idle(self, msg: BatchIdle, env: Envelope) -> None:
        env.detail.update(msg.stats)
        if msg.loop is self._loop:
            await self._loop_ended(env)
        return None                          # else a newer loop runs: it ends the job

    async def _loop_ended(self, env: Envelope | None) -> None:
        """The loop is over: restart it for requests a revoke held back, else end the GPU job."""
        loop = self._loop
        if self.engine is None or loop is None or not loop.done():
            return
        self._loop = None
        self.engine.ended()
        keep, self._yield_keep = self._yield_keep, False
        if self.engine.yielded and self.lease is not None and self.lease.busy:
            # paused for a waiting model: free the KV cache; then either keep the weights
            # (the cache was enough for it) or give the whole grant back; queue for the GPU
            # again behind that model
            if env is not None:
                env.detail.update(yielded=True, kv_freed_bytes=self.engine.cache_bytes(),
                                  kept_weights=keep)
            await self.system.executor.run(self.engine.release)
            if keep:
                self.lease.paused_keeping_weights(env)
            else:
                await self.lease.give_back(env)
                self.device = "cpu"
            keep = False
        if not self._holding and self.engine.pending:
            await self._start_loop(env)     # (a new grant makes a pending trim moot)
            return
        if self.lease is not None and self.lease.busy:
            if self.spec.idle_on_cpu and self.spec.device == "flex":
                await self.system.executor.run(self.engine.release)    # before the eviction
            await self.lease.finish(env)
            self.device = "cuda" if self.lease.on_gpu else "cpu"
        if keep:                            # asked to yield its cache, ended first: trim now
            await self.trim_working(env)
        elif self.lease is None and self.engine.cache is not None:
            # CPU only: nobody asks for the cache back, so an idle batch frees it now (a
            # 16-stream burst leaves 100-400 MB; a new one for the next chat costs ~1 ms)
            await self.system.executor.run(free_idle_cache, self.engine)

    async def _quiesce(self, env: Envelope | None) -> None:
        """Let the running batch finish (admitting nobody), then free its KV cache and graphs."""
        eng = self.engine
        if eng is None:
            return
        loop = self._loop
        if loop is not None:
            self._holding = True
            eng.drain()
            try:
                await asyncio.shield(loop)
            except Exception:  # noqa: BLE001 - the requests already got the error
                pass
            await self._loop_ended(env)      # ends the GPU job now (its BatchIdle comes later)
            self._holding = False
        if env is not None and eng.cache is not None:
            env.detail["kv_freed_bytes"] = eng.cache_bytes()
        await self.system.executor.run(eng.release)

    async def trim_working(self, env: Envelope | None) -> None:
        """Idle: free the KV cache and the graphs, keep the weights on the GPU."""
        eng = self.engine
        if eng is not None and self._loop is None and eng.cache is not None:
            if env is not None:
                env.detail["kv_freed_bytes"] = eng.cache_bytes()
            await self.system.executor.run(eng.release)
        await super().trim_working(env)

    @property
    def restore_extra_s(self) -> float:
        """Besides the weights' copy, an evicted LLM captures its decode graphs again."""
        return self.engine.runner.capture_s_per_set() if self.engine is not None else 0.0

    @property
    def trim_extra_s(self) -> float:
        """A trimmed LLM (KV cache freed, weights kept) captures its decode graphs again too:
        they were captured against the cache's addresses (the arbiter's trim cost); not
        when the cache is stable (runtime/stable_memory.py): it comes back at its addresses."""
        if self.engine is None or self.engine.runner.keeps_graphs:
            return 0.0
        return self.restore_extra_s

    def _seq_done(self, env: Envelope, req: SeqRequest, res: Any) -> None:
        self._unanswered -= 1
        env.detail.update(req.detail())
        if isinstance(res, ChatResult):
            env.detail.update(prompt_tokens=res.prompt_tokens,
                              completion_tokens=res.completion_tokens)
        elif isinstance(res, BaseException) and is_oom(res):
            res = Overloaded(f"llm {self.spec.name!r} ran out of GPU memory with "
                             f"{req.max_batch or 1} sequence(s) in the batch; retry.")
        elif isinstance(res, BaseException) and not isinstance(res, ServiceError):
            # the client gets the request id, the log gets the exception (never its text
            # in a reply)
            log.error("%s failed on request %s: %r", self.name, env.request_id, res,
                      exc_info=res)
            env.detail["error_detail"] = repr(res)[:300]
            res = ModelFailed(f"llm {self.spec.name!r} failed on this request (request id "
                              f"{env.request_id}); the server log has the details.")
        self.reply_to(env, res)

    async def on_stop(self) -> None:
        loop = self._loop
        stopped = ActorStopped(f"llm {self.name!r} was stopped")
        if self.engine is not None and loop is not None and not loop.done():
            self.engine.abort(stopped)
            try:
                await asyncio.shield(loop)
            except Exception:  # noqa: BLE001
                pass
        if self.engine is not None:
            if self._loop is not None and self._loop.done():
                self._loop = None
                self.engine.ended()
            if not self.engine.running:
                self.engine.fail_all(stopped)       # those that waited for a loop
        for req in self._handed.values():
            self.reply_to(req.owner, stopped)
        self._handed.clear()
        if self.engine is not None and self.system is not None:
            await self.system.executor.run(self.engine.close)
        if self.lease is not None and self.lease.busy:
            await self.lease.finish()                 # the last loop's job, then give it back
        if self._loop_thread is not None:
            self._loop_thread.shutdown(wait=False)
            self._loop_thread = None
        if self._prompts is not None:
            self._prompts.close()
            self._prompts = None
        await super().on_stop()

    def encode_prompt(self, msg: Chat) -> list[int]:
        """``msg``'s prompt as token ids. A chat is rendered through the chat template and the
        text encoded without the tokenizer's special tokens (the template writes its own), as
        ``apply_chat_template(tokenize=True)`` encodes it, less its tensors: a third of the
        time of a ~220-token prompt, which the batch loop spends per prompt of a burst; and
        from the Rust tokenizer straight where transformers' call is only that
        (actors/prompt_tokens.py)."""
        tok = self.tokenizer
        if msg.messages is not None:
            messages, tools = llm_tools.template_inputs(tok, msg)
            if tok.chat_template is None:
                text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) \
                    + "\nassistant:"
                return text_ids(tok, text)
            text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                           tokenize=False)
            return text_ids(tok, text, add_special_tokens=False)
        return text_ids(tok, msg.prompt or "")

    def _generate(self, req: SeqRequest) -> ChatResult:
        """The path without continuous batching (actors/llm_generate.py)."""
        prepared(req, self._prepare)        # (begun on a prompt thread by an engine since gone)
        self._go_ahead(req)
        return generate(self.model, self.tokenizer, req)


def _no_callback(req: SeqRequest, res: Any) -> None:
    """A request's ``on_done`` until an engine takes it."""


def _answer_to(loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    """An ``on_done`` (called on the engine's thread) that sets ``fut`` on ``loop``."""
    def settle(res: Any) -> None:
        if not fut.done():
            fut.set_result(res)

    def done(req: SeqRequest, res: Any) -> None:
        loop.call_soon_threadsafe(settle, res)
    return done


def _nonneg_int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _pos_int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)
