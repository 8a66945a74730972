"""The LLM actor: transformers causal LMs (GGUF files or HF folders), chat templates, streaming.

Generation runs in the executor; each new piece of text is pushed to the request's
:class:`TokenStream` from the generating thread. Stop strings, client cancellation and
max_tokens all end generation early through one stopping criterion.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import threading
from typing import Any

import torch

from ..runtime.actor import Envelope
from ..runtime.errors import InvalidRequest
from .messages import Chat, ChatResult
from .model_base import ModelActor, module_bytes

log = logging.getLogger("agile_rag.llm")


def gguf_location(path: str) -> tuple[str, str] | None:
    """(folder, file name) when ``path`` is a .gguf file or a folder holding one GGUF only."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        found = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(found) == 1:
            return path, os.path.basename(found[0])
    return None


class LLMActor(ModelActor):
    kind = "llm"

    def __init__(self, spec, params=None, *, cache_dir: str | None = None, **kw):
        super().__init__(spec, params, **kw)
        self.cache_dir = cache_dir
        self.model = None
        self.tokenizer = None
        self.context_length = 2048

    # ---- loading ---------------------------------------------------------------------------
    def load_blocking(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = self.spec
        common = {"trust_remote_code": spec.trust_remote_code}
        # dtype only when the entry asks: passing one to a GGUF load drops tied lm_head weights
        dtype = {"dtype": _dtype(spec.dtype)} if spec.dtype else {}
        gguf = gguf_location(spec.path)
        if gguf is None:
            model = AutoModelForCausalLM.from_pretrained(spec.path, **dtype, **common)
        else:
            model = self._load_gguf(*gguf, dtype=dtype, common=common)
        tok_gguf = gguf_location(spec.tokenizer_path)
        cached = getattr(model, "_agile_cached_dir", None)
        if cached and spec.tokenizer_path == spec.path:
            tokenizer = AutoTokenizer.from_pretrained(cached, **common)
        elif tok_gguf is not None:
            tokenizer = AutoTokenizer.from_pretrained(tok_gguf[0], gguf_file=tok_gguf[1], **common)
        else:
            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path, **common)
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.weight_bytes = module_bytes(model)
        self.model_limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(spec.max_tokens or self.model_limit, self.model_limit)

    def working_bytes(self, items: int) -> int:
        """KV cache for the whole context plus activations."""
        cfg = self.model.config
        layers = getattr(cfg, "num_hidden_layers", 24)
        heads = getattr(cfg, "num_attention_heads", 16)
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        size = next(self.model.parameters()).element_size()
        return 2 * layers * kv * head_dim * self.context_length * size + 128 * 2**20

    def update(self, spec, params) -> bool:
        super().update(spec, params)
        if self.model is not None:
            self.context_length = min(spec.max_tokens or self.model_limit, self.model_limit)
        return True

    def _load_gguf(self, folder: str, fname: str, *, dtype: dict, common: dict):
        """GGUF dequantises slowly (~25 s for 135M); keep the dequantised model in a cache
        folder so later starts load it in under a second."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        full = os.path.join(folder, fname)
        cache = None
        if self.cache_dir:
            st = os.stat(full)
            key = hashlib.sha1(f"{os.path.abspath(full)}|{st.st_size}|{st.st_mtime_ns}".encode())
            cache = os.path.join(self.cache_dir, "gguf", key.hexdigest()[:16])
            if os.path.exists(os.path.join(cache, "done")):
                log.info("%s: using dequantised cache %s", self.name, cache)
                model = AutoModelForCausalLM.from_pretrained(cache, **dtype, **common)
                model._agile_cached_dir = cache
                return model
        log.info("%s: dequantising GGUF %s (first load only)", self.name, full)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **common)
        if dtype:
            model = model.to(dtype["dtype"])
        if cache:
            tmp = cache + f".tmp{os.getpid()}"
            try:
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(tmp)
                AutoTokenizer.from_pretrained(folder, gguf_file=fname, **common).save_pretrained(tmp)
                open(os.path.join(tmp, "done"), "w").close()
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                os.replace(tmp, cache)
                model._agile_cached_dir = cache
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("%s: could not cache the dequantised model: %s", self.name, exc)
        return model

    def unload_blocking(self) -> None:
        self.model = None
        self.tokenizer = None

    # ---- serving ----------------------------------------------------------------------------
    async def serve(self, msg: Any, env: Envelope) -> Any:
        if not isinstance(msg, Chat):
            raise TypeError(f"LLM actor cannot handle {type(msg).__name__}")
        result = await self.compute(1, env, self._generate, msg)
        env.detail.update(prompt_tokens=result.prompt_tokens,
                          completion_tokens=result.completion_tokens)
        return result

    def encode_prompt(self, msg: Chat) -> torch.Tensor:
        tok = self.tokenizer
        if msg.messages is not None:
            if tok.chat_template is None:
                text = "\n".join(f"{m['role']}: {m['content']}" for m in msg.messages) \
                    + "\nassistant:"
                ids = tok(text, return_tensors="pt")["input_ids"]
            else:
                ids = tok.apply_chat_template(msg.messages, add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tok(msg.prompt, return_tensors="pt")["input_ids"]
        return ids

    def _generate(self, msg: Chat) -> ChatResult:
        ids = self.encode_prompt(msg)
        n_prompt = ids.shape[1]
        room = self.context_length - n_prompt
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"prompt has {n_prompt} tokens. Shorten the messages.",
                param="messages", code="context_length_exceeded")
        max_new = room if msg.max_tokens is None else min(msg.max_tokens, room)
        streamer = _Streamer(self.tokenizer, msg)
        if msg.stream is not None:
            msg.stream.push_threadsafe("")          # prompt accepted: headers may go out
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "streamer": streamer,
                                  "stopping_criteria": [_StopWhen(streamer, msg.cancel)],
                                  "attention_mask": torch.ones_like(ids, device=self.model.device)}
        if msg.temperature > 0:
            kwargs.update(do_sample=True, temperature=msg.temperature, top_p=msg.top_p, top_k=0)
            if msg.seed is not None:
                torch.manual_seed(msg.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.inference_mode():
            self.model.generate(ids.to(self.model.device), pad_token_id=pad, **kwargs)
        text = streamer.finish()
        n_out = streamer.n_tokens
        if msg.cancel.is_set():
            reason = "cancelled"
        elif streamer.hit_stop or streamer.hit_eos:
            reason = "stop"
        elif n_out >= max_new:
            reason = "length"
        else:
            reason = "stop"
        return ChatResult(text, reason, n_prompt, n_out)


class _Streamer:
    """transformers streamer: decodes new tokens, applies stop strings, pushes text pieces."""

    def __init__(self, tokenizer, msg: Chat):
        self.tok = tokenizer
        self.msg = msg
        self.ids: list[int] = []
        self.emitted = 0                 # characters of the decoded text already sent
        self.text = ""
        self.hit_stop = False
        self.hit_eos = False
        self.prompt_seen = False
        self.n_tokens = 0
        self.eos = set(_as_list(tokenizer.eos_token_id))
        self.hold = max((len(s) for s in msg.stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:             # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.hit_stop:
            return
        for tid in value.reshape(-1).tolist():
            if tid in self.eos:
                self.hit_eos = True
                continue
            self.ids.append(tid)
            self.n_tokens += 1
        self._emit(final=False)

    def end(self) -> None:
        if not self.hit_stop:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = len(text)
        for s in self.msg.stop:
            i = text.find(s)
            if i != -1 and i < cut:
                cut = i
                self.hit_stop = True
        if self.hit_stop:
            text = text[:cut]
            safe = cut
        elif final:
            safe = len(text)
        else:
            safe = len(text) - self.hold
            while safe > 0 and text[safe - 1] == "\ufffd":   # an unfinished UTF-8 character
                safe -= 1
        self.text = text
        if safe > self.emitted:
            piece = text[self.emitted:safe]
            self.emitted = safe
            if self.msg.stream is not None:
                self.msg.stream.push_threadsafe(piece)

    def finish(self) -> str:
        return self.text[:self.emitted] if self.hit_stop else self.text


class _StopWhen:
    """Stopping criterion: a stop string was seen, or the client went away."""

    def __init__(self, streamer: _Streamer, cancel: threading.Event):
        self.streamer = streamer
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.streamer.hit_stop or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple, set)) else [v]


def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)
