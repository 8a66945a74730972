"""runtime/thread_tuner.py: the CPU decode loop keeps the torch thread count its steps measure
faster (every core on a quiet machine, one less when another process takes a core), compares
steps of the same batch size only, and is on only when TORCH_THREADS is auto."""
from __future__ import annotations

import pytest

from agile_rag.runtime import executor
from agile_rag.runtime.thread_tuner import ThreadTuner

CLOCK = [0.0]


def run(tuner: ThreadTuner, steps: int, cost: dict[int, float], rows: int = 1,
        pause: float = 0.0) -> list[int]:
    """``steps`` back-to-back decode steps (after ``pause`` seconds idle) whose seconds depend
    on the thread count; the counts used."""
    CLOCK[0] += pause
    used = []
    for _ in range(steps):
        n = tuner.threads(rows, CLOCK[0])
        used.append(n)
        CLOCK[0] += cost[n]
        tuner.observe(rows, cost[n], CLOCK[0])
    return used


def test_a_quiet_machine_gets_every_core_and_a_busy_one_one_less_within_a_few_steps():
    t = ThreadTuner(1, 2)
    assert run(t, 3, {1: 0.015, 2: 0.010})[0] == 1          # starts at the safe count
    used = run(t, 120, {1: 0.015, 2: 0.010})
    assert t.current == 2 and used[-40:].count(2) >= 33       # probes of 1 now and then
    # another process takes a core: 2 threads wait for each other, 1 thread barely notices
    used = run(t, 12, {1: 0.016, 2: 0.030})
    assert t.current == 1, used                               # seen at once, not at the next probe
    assert used[-3:] == [1, 1, 1]
    # the core comes back: the next probe finds it
    run(t, 200, {1: 0.015, 2: 0.010})
    assert t.current == 2 and t.switches == 3


def test_equal_counts_keep_the_safe_one_and_a_new_batch_size_is_measured_afresh():
    t = ThreadTuner(1, 2)
    run(t, 300, {1: 0.010, 2: 0.0098})                        # within the margin: no switch
    assert t.current == 1 and t.switches == 0 and t.probes >= 2
    # 16 rows: 2 threads twice as fast; the 1-row history does not count against it
    run(t, 120, {1: 0.040, 2: 0.020}, rows=16)
    assert t.current == 2
    t.observe(3, 99.0)                                        # not the rows asked for: ignored
    assert t.current == 2


def test_a_new_batch_size_compares_the_counts_after_two_steps():
    """A stream that starts while another process holds a core: settled within a few steps,
    not at the next periodic probe."""
    t = ThreadTuner(1, 2)
    run(t, 100, {1: 0.015, 2: 0.010})
    run(t, 20, {1: 0.060, 2: 0.040}, rows=16)
    assert t.current == 2
    used = run(t, 8, {1: 0.016, 2: 0.030})                    # 1 row again, now busy
    assert used[:2] == [2, 2] and t.current == 1 and used[-2:] == [1, 1], used


def test_a_stream_after_a_pause_compares_the_counts_again():
    """Streams of one row, one after another: the one that starts while a core is taken goes
    to one thread in a few steps, and the next, on a quiet machine again, back to two."""
    t = ThreadTuner(1, 2)
    run(t, 64, {1: 0.015, 2: 0.010})
    assert t.current == 2
    used = run(t, 64, {1: 0.016, 2: 0.030}, pause=2.0)         # a spinner took a core
    assert used[:2] == [2, 2] and used[6:].count(1) >= 50 and t.current == 1
    used = run(t, 64, {1: 0.015, 2: 0.010}, pause=2.0)         # it is gone
    assert used[:2] == [1, 1] and used[6:].count(2) >= 50 and t.current == 2
    used = run(t, 6, {1: 0.015, 2: 0.010}, pause=0.01)         # no pause: no new comparison
    assert used == [2] * 6


def test_probes_that_confirm_the_count_come_less_often_and_a_busy_core_is_still_seen_at_once():
    t = ThreadTuner(1, 2)
    used = run(t, 3000, {1: 0.015, 2: 0.010})
    # probes after 2 steps, then 48, 96, 192, 384, 384... steps apart: ~11 in 3000 steps
    # (every 48: ~55); each costs its 6 steps at the slower count
    assert t.current == 2 and t.probes <= 12 and used.count(1) <= 12 * 6 + 3, t.probes
    used = run(t, 8, {1: 0.016, 2: 0.030})                    # a core taken: seen at once
    assert t.current == 1 and used[-3:] == [1, 1, 1], used
    t.threads(1, CLOCK[0])
    assert t._every == t.probe_every                           # and probes are frequent again
    run(t, 100, {1: 0.015, 2: 0.010})                         # the core back: found soon
    assert t.current == 2


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError):
        ThreadTuner(2, 2)
    with pytest.raises(ValueError):
        ThreadTuner(0, 2)


def test_the_range_is_chosen_only_when_torch_threads_is_auto(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(executor, "usable_cores", lambda: 2)
    assert executor.decode_thread_range(0) == (1, 2)
    assert executor.decode_thread_range(None) == (1, 2)
    assert executor.decode_thread_range(2) is None            # a count given is kept
    assert executor.decode_thread_range(1) is None
    monkeypatch.setattr(executor, "usable_cores", lambda: 1)
    assert executor.decode_thread_range(0) is None            # nothing to choose between
    monkeypatch.setattr(executor, "usable_cores", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert executor.decode_thread_range(0) is None


def test_a_runner_with_a_tuner_decodes_what_one_without_does():
    """The real runner's CPU decode step under the tuner (counts switching between steps):
    the same logits' choices as without it."""
    import torch
    from test_lean_decode import _runner, _tiny

    from agile_rag.actors.llm_lean_decode import agrees, lean_decoder

    model = _tiny("Llama")
    plain, tuned = _runner(model), _runner(model)
    plain.lean = tuned.lean = lean_decoder(model)
    tuned.tuner = ThreadTuner(1, 2, probe_every=2, probe_steps=2)
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(1)
    try:
        with torch.inference_mode():
            for step in range(10):
                ids = torch.randint(0, 300, (2,), generator=g)
                pos, rows = torch.tensor([4, 7]) + step, torch.arange(2)
                view = int(pos.max()) + 1
                n = tuned.tuner.threads(2)
                executor.apply_torch_threads(n)
                got = tuned._lean_run(ids, pos, rows, view)
                tuned.tuner.observe(2, 0.01 if n == 2 else 0.02)
                assert agrees(got, plain._lean_run(ids, pos, rows, view))
        assert tuned.tuner.probes >= 1
    finally:
        torch.set_num_threads(before)


def test_one_noisy_step_does_not_decide_a_probe():
    """Another process on the machine slows a single step now and then: medians, not means,
    so one 5x step in a probe of the faster count does not keep the slower one."""
    t = ThreadTuner(1, 2)
    noisy = iter([0.015, 0.015, 0.010, 0.050, 0.010, 0.010, 0.010, 0.010] + [0.010] * 100)
    for _ in range(8):
        n = t.threads(1, CLOCK[0])
        c = next(noisy) if n == 2 else 0.015
        CLOCK[0] += c
        t.observe(1, c, CLOCK[0])
    assert t.current == 2
