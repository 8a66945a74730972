"""runtime.layer_stream.LayerStream on the CPU: the same hooks and slot buffers as on a GPU, the
copies as plain copy_. A streamed module computes bit-identical outputs to the plain module
(embedders and cross-encoders, BERT and XLM-R, K = 2 and 3, several passes in a row), and detach
leaves it exactly as it was (same tensors, same storage, no hooks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agile_rag.runtime.layer_stream import LayerStream, find_blocks
from agile_rag.runtime.residency import WeightResidency

from support import minilm_dir

VOCAB = 400


def _bert_cfg(**over):
    from transformers import BertConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64)
    kw.update(over)
    return BertConfig(**kw)


def _xlmr_cfg(**over):
    from transformers import XLMRobertaConfig
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=5, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=80, type_vocab_size=2,
              pad_token_id=1)
    kw.update(over)
    return XLMRobertaConfig(**kw)


def bert_model():
    from transformers import BertModel
    torch.manual_seed(0)
    return BertModel(_bert_cfg()).eval()


def bert_cls():
    from transformers import BertForSequenceClassification
    torch.manual_seed(1)
    return BertForSequenceClassification(_bert_cfg(num_labels=1, initializer_range=1.0)).eval()


def xlmr_cls():
    from transformers import XLMRobertaForSequenceClassification
    torch.manual_seed(2)
    return XLMRobertaForSequenceClassification(_xlmr_cfg(num_labels=1)).eval()


def _inputs(seed=0, batch=3, seq=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0                     # one padded row: the mask path runs too
    ids[1, seq // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tensors(m):
    return list(m.parameters()) + list(m.buffers())


def _snapshot(m):
    return [(t, t.data_ptr(), t.device, t.shape, t.clone()) for t in _tensors(m)]


def _same_as(m, snap):
    now = _tensors(m)
    return len(now) == len(snap) and all(
        t is t0 and t.data_ptr() == p0 and t.device == d0 and t.shape == s0 and torch.equal(t, v0)
        for t, (t0, p0, d0, s0, v0) in zip(now, snap))


def _hook_count(m):
    return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())


def _assert_in_slots(ls):
    """While attached, every layer tensor is a view of the layer's slot, so every parameter
    reports the stream's device (before the first pass too)."""
    for i, layer in enumerate(ls.blocks):
        buf = ls._slot_bufs[i % ls.slots]
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        for t in list(layer.parameters()) + list(layer.buffers()):
            assert lo <= t.data_ptr() < hi


def _check_streamed(model, make_inputs, *, slots, stage=None, passes=3):
    with torch.inference_mode():
        refs = [_out(model, make_inputs(i)) for i in range(passes)]
        snap = _snapshot(model)
        hooks = _hook_count(model)
        ls = LayerStream(model, "cpu", slots=slots, stage=stage)
        assert ls.attach()["bytes"] == ls.weight_bytes
        assert ls.attached and _hook_count(model) > hooks
        _assert_in_slots(ls)
        for i in range(passes):
            out = _out(model, make_inputs(i))
            assert torch.equal(out, refs[i]), (i, (out - refs[i]).abs().max())
        st = ls.stats()
        assert st["passes"] == passes and st["aborted_passes"] == 0
        assert st["layer_copies"] == passes * ls.num_layers
        assert st["bytes_copied"] == passes * ls.bytes_per_pass
        assert ls.detach()["bytes"] == ls.weight_bytes
        assert not ls.attached and _hook_count(model) == hooks
        assert _same_as(model, snap)
        assert torch.equal(_out(model, make_inputs(0)), refs[0])
    return ls


# ---- block discovery --------------------------------------------------------------------------
def test_find_blocks():
    assert find_blocks(bert_model())[0] == "encoder.layer"
    assert find_blocks(bert_cls())[0] == "bert.encoder.layer"
    assert find_blocks(xlmr_cls())[0] == "roberta.encoder.layer"
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    mixed = nn.Module()
    mixed.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4)])
    mixed.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    assert find_blocks(mixed)[0] == "blocks"


# ---- identical outputs ------------------------------------------------------------------------
@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("stage", [False, True])
def test_bare_bert_embedder(slots, stage):
    ls = _check_streamed(bert_model(), lambda i: _inputs(i), slots=slots, stage=stage)
    assert ls.staged is stage
    assert ls.stats()["copies_per_layer"] == (1 if stage else 16)


@pytest.mark.parametrize("build", [bert_cls, xlmr_cls])
@pytest.mark.parametrize("slots", [2, 3])
def test_cross_encoders(build, slots):
    _check_streamed(build(), lambda i: _inputs(i), slots=slots)


def test_from_residency_master_copy():
    """Wrapped by a WeightResidency: each layer is one contiguous range of the flat master copy
    (one copy per layer, no staging), and detach leaves the residency's views in place."""
    model = xlmr_cls()
    with torch.inference_mode():
        ref = _out(model, _inputs(0))
    res = WeightResidency(model, pin=False)
    host = res.host_buffer
    lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
    ls = _check_streamed(model, lambda i: _inputs(i), slots=2)
    assert not ls.staged and ls.stats()["copies_per_layer"] == 1
    assert ls.stats()["source"] == "host"
    assert all(lo <= t.data_ptr() < hi for t in _tensors(model))
    # the slot holds the packed layer: no more than one layer's share of the master copy
    assert ls.slot_bytes <= res.buffer_bytes
    assert ls.model_bytes <= res.buffer_bytes + ls.num_layers * 256
    with torch.inference_mode():
        assert torch.equal(_out(model, _inputs(0)), ref)
    # residency still works after a detach (here: nothing to admit without CUDA)
    assert not res.on_gpu


def test_sentence_transformer_embedder(tmp_path):
    """A SentenceTransformer wrapping a tiny BertModel saved locally with MiniLM's tokenizer:
    encode (which calls the root's forward directly, skipping its hooks) gives the same
    embeddings streamed, over several batches per call."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(3)
    BertModel(_bert_cfg(vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(
        tmp_path)
    tok.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    texts = ["a cat sits on the mat", "the stock market fell today",
             "streaming layers through two slots", "", "x " * 40]
    ref = st.encode(texts, batch_size=2, convert_to_tensor=True)
    snap = _snapshot(st)
    ls = LayerStream(st, "cpu", slots=2)
    assert ls.blocks_name.endswith("encoder.layer")
    ls.attach()
    for _ in range(2):
        out = st.encode(texts, batch_size=2, convert_to_tensor=True)
        assert torch.equal(out, ref)
    assert ls.stats()["passes"] == 6            # 3 batches per encode
    ls.detach()
    assert _same_as(st, snap) and _hook_count(st) == 0
    assert torch.equal(st.encode(texts, batch_size=2, convert_to_tensor=True), ref)


def test_cross_encoder_predict(tmp_path):
    """sentence-transformers' CrossEncoder (the reranker actor's path) over a tiny XLM-R saved
    with the MiniLM tokenizer: predict's scores are identical streamed."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, XLMRobertaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(4)
    XLMRobertaForSequenceClassification(_xlmr_cfg(
        vocab_size=tok.vocab_size, num_labels=1, initializer_range=1.0, pad_token_id=0,
        max_position_embeddings=130)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ce = CrossEncoder(str(tmp_path), device="cpu", max_length=64)
    pairs = [("what is a tide", f"passage {i} about the moon and the sea " * (i % 4 + 1))
             for i in range(7)]
    ref = ce.predict(pairs, batch_size=3, convert_to_tensor=True)
    module = ce if isinstance(ce, nn.Module) else ce.model
    ls = LayerStream(module, "cpu", slots=3)
    ls.attach()
    out = ce.predict(pairs, batch_size=3, convert_to_tensor=True)
    # the same weights at other addresses: with sentence-transformers 6.3 on this CPU the
    # scores came out up to one float32 step (6e-8) off, so: equal within 1e-6
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert ls.stats()["passes"] == 3
    ls.detach()
    assert _hook_count(module) == 0
    assert torch.equal(ce.predict(pairs, batch_size=3, convert_to_tensor=True), ref)


@pytest.mark.parametrize("build", [bert_model, xlmr_cls])
def test_host_embeddings(build):
    """host_embeddings=True: the word-embedding table (bigger than a layer) stays in host memory
    and is looked up there; the outputs are the same, the resident parts smaller, and detach
    gives the embedding module its own forward back."""
    from agile_rag.actors.torch_util import module_bytes

    model = build()
    words = model.get_input_embeddings()
    assert module_bytes(words) > module_bytes(find_blocks(model)[1][0])   # bigger than a layer
    plain = LayerStream(model, "cpu")
    ls = LayerStream(model, "cpu", host_embeddings=True)
    assert ls.host_embedding_bytes == module_bytes(words)
    assert ls.resident_bytes <= plain.resident_bytes - module_bytes(words) + 256
    assert ls.model_bytes >= plain.model_bytes - 256
    snap_words = words.weight.detach().clone()
    with torch.inference_mode():
        refs = [_out(model, _inputs(i)) for i in range(2)]
        snap = _snapshot(model)
        ls.attach()
        assert "forward" in words.__dict__
        _assert_in_slots(ls)
        # the table's parameter is a placeholder of its shape and dtype on the device
        assert words.weight.shape == snap_words.shape and words.weight.stride() == (0, 0)
        for i in range(2):
            assert torch.equal(_out(model, _inputs(i)), refs[i])
        assert ls.stats()["host_lookups"] == 2 and ls.stats()["passes"] == 2
        # a group looks each forward up once (its replay skips the gather), plus the check
        outs = ls.run_group([lambda i=i: _out(model, _inputs(i)) for i in range(2)])
        assert all(torch.equal(o, r) for o, r in zip(outs, refs))
        assert ls.stats()["host_lookups"] == 2 + 2 + 1
        ls.detach()
        assert "forward" not in words.__dict__ and _same_as(model, snap)
        assert torch.equal(_out(model, _inputs(0)), refs[0])


class _Stiff(nn.Parameter):
    """A parameter whose .data cannot be swapped (as some inference-mode tensors on older
    torch versions): the stream must replace the registered object instead, and put it back."""

    @property
    def data(self):
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value):
        raise RuntimeError("cannot swap .data")


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("scale", torch.full((d,), 0.5))

    def forward(self, x):
        return self.norm(x + torch.tanh(self.lin(x)) * self.scale)


class _Encoder(nn.Module):
    """Not a transformers model: the blocks are found by shape alone."""

    def __init__(self, d=16, n=4):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_generic_module_and_unswappable_tensors():
    torch.manual_seed(5)
    model = _Encoder().eval()
    for b in model.blocks:
        b.lin.weight = _Stiff(b.lin.weight.detach().clone(), requires_grad=False)
    model.head.weight = _Stiff(model.head.weight.detach().clone(), requires_grad=False)
    ids = torch.randint(0, 50, (3, 7))
    with torch.inference_mode():
        ref = model(ids)
        snap = _snapshot(model)
        ls = LayerStream(model, "cpu", slots=3)
        assert ls.blocks_name == "blocks"
        ls.attach()
        stiff_head = next(t for t, *_ in snap if t is not None and type(t) is _Stiff
                          and t.shape == (1, 16))
        assert type(model.head.weight) is nn.Parameter   # over the resident buffer, in its place
        assert model.head.weight.data_ptr() != stiff_head.data_ptr()
        for _ in range(3):
            assert torch.equal(model(ids), ref)
            assert all(type(b.lin.weight) is nn.Parameter for b in model.blocks)
        ls.detach()
        assert _same_as(model, snap) and _hook_count(model) == 0
        assert all(type(b.lin.weight) is _Stiff for b in model.blocks)
        assert torch.equal(model(ids), ref)


# ---- lifecycle --------------------------------------------------------------------------------
def test_attach_detach_idempotent_and_reattach():
    model = bert_cls()
    with torch.inference_mode():
        ref = _out(model, _inputs(0))
        ls = LayerStream(model, "cpu")
        assert ls.detach() == {"bytes": 0, "seconds": 0.0}
        ls.attach()
        assert ls.attach()["bytes"] == 0
        hooks = _hook_count(model)
        assert hooks == 2 * ls.num_layers + 6   # pre + post on the layers, root, bert, encoder
        ls.detach()
        assert ls.detach()["bytes"] == 0 and _hook_count(model) == 0
        for _ in range(2):
            ls.attach()
            assert torch.equal(_out(model, _inputs(0)), ref)
            ls.detach()
        assert ls.stats()["attaches"] == 3 and ls.stats()["detaches"] == 3
        ls.release()
        assert _hook_count(model) == 0 and torch.equal(_out(model, _inputs(0)), ref)
        with pytest.raises(RuntimeError, match="release"):
            ls.attach()


def test_pass_that_raises_midway_then_recovers():
    model = bert_model()
    with torch.inference_mode():
        ref = _out(model, _inputs(0))
        ls = LayerStream(model, "cpu")
        ls.attach()
        boom = {"left": 1}

        def fail(module, args):
            if boom["left"]:
                boom["left"] -= 1
                raise RuntimeError("boom")
        h = model.encoder.layer[2].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            _out(model, _inputs(0))
        for _ in range(2):
            assert torch.equal(_out(model, _inputs(0)), ref)
        h.remove()
        st = ls.stats()
        assert st["aborted_passes"] == 1 and st["passes"] == 2
        with pytest.raises(RuntimeError, match="out of order"):
            model.encoder.layer[3](torch.zeros(1, 4, 32))
        ls.detach()
        assert torch.equal(_out(model, _inputs(0)), ref)


def test_forwards_from_several_threads():
    """The encoder engine keeps two forwards in flight on a GPU, from two threads: the passes
    are serialised (layers of one never interleave with the other's), results unchanged."""
    import threading

    model = xlmr_cls()
    with torch.inference_mode():
        refs = [_out(model, _inputs(i)) for i in range(4)]
    ls = LayerStream(model, "cpu", slots=2)
    ls.attach()
    errors = []
    inside = {"n": 0, "max": 0}
    lock = threading.Lock()

    def enter(m, a):
        with lock:
            inside["n"] += 1
            inside["max"] = max(inside["max"], inside["n"])

    def leave(m, a, o):
        with lock:
            inside["n"] -= 1
    hooks = [layer.register_forward_pre_hook(enter) for layer in model.roberta.encoder.layer]
    hooks += [layer.register_forward_hook(leave) for layer in model.roberta.encoder.layer]

    def work(k):
        try:
            with torch.inference_mode():
                for r in range(6):
                    i = (k + r) % 4
                    assert torch.equal(_out(model, _inputs(i)), refs[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for h in hooks:
        h.remove()
    assert not errors, errors
    assert inside["max"] == 1
    st = ls.stats()
    assert st["passes"] == 18 and st["aborted_passes"] == 0
    ls.detach()


def test_sizes_for_the_arbiter():
    from agile_rag.actors.torch_util import module_bytes

    model = xlmr_cls()
    whole = module_bytes(model)
    layer = module_bytes(model.roberta.encoder.layer[0])
    for k in (2, 3):
        ls = LayerStream(model, "cpu", slots=k)
        assert ls.slots == k and ls.num_layers == 5
        assert layer <= ls.slot_bytes < layer + 16 * 256      # 16 tensors, each aligned
        assert ls.weight_bytes == ls.resident_bytes + k * ls.slot_bytes
        assert ls.gpu_bytes() == ls.gpu_bytes(0) == ls.weight_bytes
        assert whole - 5 * layer <= ls.resident_bytes < whole - 5 * layer + 64 * 256
        assert ls.weight_bytes < ls.model_bytes
        assert ls.bytes_per_pass == 5 * sum(p.numel() * 4 for p in
                                            model.roberta.encoder.layer[0].parameters())
        # activations: per token (2 * 64 + 8 * 32) * 4 bytes; with seq_len the scores too
        assert ls.activation_bytes(100) == 100 * (2 * 64 + 8 * 32) * 4
        assert ls.gpu_bytes(100) == ls.weight_bytes + ls.activation_bytes(100)
        assert ls.activation_bytes(100, seq_len=50) > ls.activation_bytes(100)
    assert LayerStream(model, "cpu", slots=9).slots == 5     # never more slots than layers


def test_refusals():
    with pytest.raises(ValueError, match="at least 2"):
        LayerStream(bert_model(), "cpu", slots=1)
    tied = bert_model()
    tied.encoder.layer[1].output.dense.weight = tied.encoder.layer[0].output.dense.weight
    with pytest.raises(ValueError):
        LayerStream(tied, "cpu", blocks="encoder.layer")
    shared = bert_model()            # a layer tensor viewing the resident parts' memory
    with torch.no_grad():
        emb = shared.embeddings.word_embeddings.weight
        shared.encoder.layer[2].output.LayerNorm.weight.data = emb[0]
    with pytest.raises(ValueError, match="shares host memory"):
        LayerStream(shared, "cpu")
    moved = bert_model()
    ls = LayerStream(moved, "cpu")
    moved.encoder.layer[0].output.dense.weight.data = \
        moved.encoder.layer[0].output.dense.weight.data.clone()
    with pytest.raises(RuntimeError, match="moved"):
        ls.attach()
    assert _hook_count(moved) == 0


# ---- the CUDA ordering protocol, on fake streams and events ------------------------------------
class _Stream:
    """A fake CUDA stream: logs what is queued on it (copies, computes, event records, waits)."""

    def __init__(self, name="side", *a, **k):
        self.name, self.ops = name, []

    def wait_event(self, ev):
        self.ops.append(("wait", ev.token))

    def wait_stream(self, other):
        token = object()
        other.ops.append(("rec", token))
        self.ops.append(("wait", token))

    def synchronize(self):
        pass


class _Event:
    def __init__(self, enable_timing=False):
        self.token = None                      # the latest record (a wait captures it)

    def record(self, stream):
        self.token = object()
        stream.ops.append(("rec", self.token))

    def query(self):
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 0.5


class _FakeCuda:
    def __init__(self):
        import threading
        self.compute = _Stream("compute")
        self._local = threading.local()      # the current stream is per thread, as in CUDA
        self.streams = [self.compute]

    @property
    def current(self):
        return getattr(self._local, "stream", self.compute)

    @current.setter
    def current(self, s):
        self._local.stream = s

    def install(self, monkeypatch):
        import contextlib
        fake = self

        def new_stream(*a, **k):
            s = _Stream()
            fake.streams.append(s)
            return s

        @contextlib.contextmanager
        def stream(s):
            prev, fake.current = fake.current, s
            try:
                yield
            finally:
                fake.current = prev

        from types import SimpleNamespace

        from agile_rag.runtime import layer_stream
        monkeypatch.setattr(layer_stream, "_cuda", SimpleNamespace(
            is_available=lambda: True, Stream=new_stream, Event=_Event, stream=stream,
            current_stream=lambda *a, **k: fake.current, current_device=lambda: 0))


def _simulate(streams, rng, slots):
    """Run the logged streams in one random interleaving that respects the waits; every compute
    of layer i must find layer i's copy complete in its slot. Returns the computes seen."""
    pos = [0] * len(streams)
    done: set = set()
    content: dict = {}
    computed = []
    while True:
        ready = []
        for k, s in enumerate(streams):
            if pos[k] < len(s.ops):
                op = s.ops[pos[k]]
                if op[0] != "wait" or op[1] is None or op[1] in done:
                    ready.append(k)
        if not ready:
            assert all(p == len(s.ops) for p, s in zip(pos, streams)), "deadlock"
            return computed
        k = rng.choice(ready)
        op = streams[k].ops[pos[k]]
        pos[k] += 1
        if op[0] == "rec":
            done.add(op[1])
        elif op[0] == "copy":
            content[op[2]] = op[1]
        elif op[0] == "compute":
            assert content.get(op[2]) == op[1], f"layer {op[1]} ran on slot {op[2]} holding " \
                                                f"layer {content.get(op[2])}"
            computed.append(op[1])


@pytest.mark.parametrize("slots", [2, 3])
def test_cuda_ordering_protocol(monkeypatch, slots):
    """The CUDA path's hooks, driven with fake streams and events that log what each stream
    would run: under hundreds of random interleavings of the copy and compute streams, no layer
    ever computes on a slot whose copy has not finished or has already been overwritten (also
    across passes and after a pass that raised), and the outputs are still identical."""
    import random

    fake = _FakeCuda()
    fake.install(monkeypatch)
    model = bert_model()
    with torch.inference_mode():
        ref = _out(model, _inputs(0))
        ls = LayerStream(model, "cpu", slots=slots)
        ls._cuda = True                       # the CUDA code path, on CPU tensors
        ls.timing = True
        real_copy = ls._copy_into

        def logged_copy(j, dst, *, non_blocking):
            fake.current.ops.append(("copy", j, j % slots))
            assert fake.current is not fake.compute and non_blocking
            real_copy(j, dst, non_blocking=non_blocking)
        ls._copy_into = logged_copy
        ls.attach()
        for i, layer in enumerate(model.encoder.layer):   # runs after LayerStream's pre-hook
            layer.register_forward_pre_hook(
                lambda m, a, i=i: fake.compute.ops.append(("compute", i, i % slots)))
        for _ in range(2):
            assert torch.equal(_out(model, _inputs(0)), ref)
        rate = ls.measure_copy_rate(2)           # every layer through the slots, between passes
        assert rate["seconds"] == pytest.approx(0.5e-3) and rate["gbps"] > 0
        assert torch.equal(_out(model, _inputs(0)), ref)
        boom = model.encoder.layer[3].register_forward_pre_hook(
            lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            _out(model, _inputs(0))
        boom.remove()
        for _ in range(2):
            assert torch.equal(_out(model, _inputs(0)), ref)
        st = ls.stats()
        assert st["passes"] == 5 and st["aborted_passes"] == 1
        assert st["timed_passes"] == 5 and st["copy_seconds"] == pytest.approx(5 * 5 * 0.5e-3)
        assert st["copy_gbps"] > 0
        ls.detach()
    rng = random.Random(0)
    n = ls.num_layers
    # the raising pass logged layer 3's compute (its pre-hooks ran) and stopped there
    want = list(range(n)) * 3 + list(range(4)) + list(range(n)) * 2
    for _ in range(300):
        assert _simulate(fake.streams, rng, slots) == want
    # the copy stream really overlaps: with the compute stream held back, the copies of layers
    # 0 .. K-1 can all run before layer 0 computes, and no further
    copy = fake.streams[1]
    firsts = [op[1] for op in copy.ops if op[0] == "copy"][:slots]
    assert firsts == list(range(slots))


# ---- grouped passes (run_group) ---------------------------------------------------------------
def test_a_group_of_forwards_runs_layer_major_and_copies_each_layer_once():
    """run_group: several forwards share one copy of every layer: all of them run layer 0,
    then all of them layer 1, ...; each gets exactly its plain output."""
    import threading

    model = xlmr_cls()
    n = 5
    with torch.inference_mode():
        refs = [_out(model, _inputs(i, batch=2 + i % 3, seq=9 + 3 * i)) for i in range(n)]
    ls = LayerStream(model, "cpu", slots=2)
    ls.attach()
    order = []
    lock = threading.Lock()
    layers = model.roberta.encoder.layer

    def seen(i):
        def hook(m, a):
            if ls._group_mode != "replay":    # the replay's blocks only return their outputs
                with lock:
                    order.append(i)
        return hook
    hooks = [layer.register_forward_pre_hook(seen(i)) for i, layer in enumerate(layers)]

    def fwd(i):
        with torch.inference_mode():
            return _out(model, _inputs(i, batch=2 + i % 3, seq=9 + 3 * i))
    outs = ls.run_group([lambda i=i: fwd(i) for i in range(n)])
    for h in hooks:
        h.remove()
    for i in range(n):
        assert torch.equal(outs[i], refs[i]), i
    # layer-major; then the first group's check: a plain pass of its first forward
    assert order == [i for i in range(ls.num_layers) for _ in range(n)] + \
        list(range(ls.num_layers))
    st = ls.stats()
    assert st["passes"] == 2 and st["group_passes"] == 1 and st["group_forwards"] == n
    assert st["layer_copies"] == 2 * ls.num_layers and st["aborted_passes"] == 0
    assert ls._group_ok is True
    # plain forwards still work after a group, and so does another group
    with torch.inference_mode():
        assert torch.equal(_out(model, _inputs(1, batch=3, seq=12)), refs[1])
    outs = ls.run_group([lambda i=i: fwd(i) for i in (3, 0)])
    assert torch.equal(outs[0], refs[3]) and torch.equal(outs[1], refs[0])
    assert ls.stats()["passes"] == 4 and ls.stats()["group_passes"] == 2
    ls.detach()


def test_a_failing_forward_in_a_group_fails_alone():
    """A forward that raises before the layers (bad input), or inside a layer, leaves the
    group: the others finish with their right outputs; the stream keeps working."""
    model = bert_cls()
    with torch.inference_mode():
        refs = [_out(model, _inputs(i)) for i in range(4)]
    ls = LayerStream(model, "cpu", slots=3)
    ls.attach()
    calls = {"n": 0}

    def boom(m, a):
        if ls._group_mode == "replay":
            return
        calls["n"] += 1
        if calls["n"] == 2:                   # the second forward to reach layer 2
            raise RuntimeError("inside a layer")
    h = model.bert.encoder.layer[2].register_forward_pre_hook(boom)

    def fwd(i):
        with torch.inference_mode():
            if i == 1:
                return _out(model, {"input_ids": torch.full((1, 3), VOCAB + 5)})  # bad ids
            return _out(model, _inputs(i))
    outs = ls.run_group([lambda i=i: fwd(i) for i in range(4)])
    h.remove()
    assert isinstance(outs[1], IndexError)
    assert isinstance(outs[2], RuntimeError) and "inside a layer" in str(outs[2])
    assert torch.equal(outs[0], refs[0]) and torch.equal(outs[3], refs[3])
    assert ls.stats()["group_passes"] == 1
    outs = ls.run_group([lambda i=i: fwd(i) for i in (2, 3)])
    assert torch.equal(outs[0], refs[2]) and torch.equal(outs[1], refs[3])
    ls.detach()


def test_cuda_ordering_protocol_of_a_group(monkeypatch):
    """The CUDA path of run_group on fake streams: under hundreds of random interleavings of
    the copy and compute streams, every member's layer i finds layer i in its slot, the layers
    are copied once for the group, and a plain pass after the group is still ordered."""
    import random

    fake = _FakeCuda()
    fake.install(monkeypatch)
    model = bert_model()
    slots, n = 2, 3
    with torch.inference_mode():
        refs = [_out(model, _inputs(i)) for i in range(n)]
        ls = LayerStream(model, "cpu", slots=slots)
        ls._cuda = True
        real_copy = ls._copy_into

        def logged_copy(j, dst, *, non_blocking):
            fake.current.ops.append(("copy", j, j % slots))
            real_copy(j, dst, non_blocking=non_blocking)
        ls._copy_into = logged_copy
        ls.attach()
        for i, layer in enumerate(model.encoder.layer):
            layer.register_forward_pre_hook(
                lambda m, a, i=i: None if ls._group_mode == "replay" else
                fake.current.ops.append(("compute", i, i % slots)))

    def fwd(i):
        with torch.inference_mode():
            return _out(model, _inputs(i))
    outs = ls.run_group([lambda i=i: fwd(i) for i in range(n)])
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    with torch.inference_mode():
        assert torch.equal(_out(model, _inputs(0)), refs[0])
    assert ls.stats()["layer_copies"] == 3 * ls.num_layers     # the group, its check, a pass
    ls.detach()
    want = [i for i in range(ls.num_layers) for _ in range(n)] + list(range(ls.num_layers)) * 2
    rng = random.Random(1)
    for _ in range(300):
        assert _simulate(fake.streams, rng, slots) == want


class _ScaledEncoder(_Encoder):
    """Blocks called with an argument that changes from block to block: a group cannot
    reproduce that (it passes every block the first block's arguments)."""

    def forward(self, ids):
        x = self.emb(ids)
        for i, b in enumerate(self.blocks):
            x = b(x * (i + 1))
        return self.head(x)


def test_a_model_the_group_cannot_reproduce_falls_back_to_plain_passes():
    """The first group is checked against a plain pass: when they differ, that group's
    results are the plain passes' and every later group runs as plain passes."""
    torch.manual_seed(6)
    model = _Encoder().eval()
    plain_model = _ScaledEncoder().eval()
    plain_model.load_state_dict(model.state_dict())
    ids = [torch.randint(0, 50, (2, 5 + i)) for i in range(3)]
    with torch.inference_mode():
        refs = [plain_model(x) for x in ids]
    ls = LayerStream(plain_model, "cpu", slots=2)
    ls.attach()

    def fwd(x):
        with torch.inference_mode():
            return plain_model(x)
    for _ in range(2):
        outs = ls.run_group([lambda x=x: fwd(x) for x in ids])
        assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert ls._group_ok is False and ls.stats()["group_passes"] == 1
    ls.detach()
