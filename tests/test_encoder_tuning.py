"""The encoders' CPU forwards choose their torch thread count within bursts of a few forwards
(actors/encoder_jobs.py: ENCODER_PROBE_EVERY, _STEPS, _IDLE_S). Regression: with the LLM
decode loop's settings a burst of one-sentence requests (a few forwards, then a pause) never
finished a probe, so the embedder stayed on one thread of two and
benchmarks/embed_throughput.py fell from 0.83 to 0.41 of a direct encode."""
from __future__ import annotations

from agile_rag.actors.encoder_jobs import ENCODER_IDLE_S, ENCODER_PROBE_EVERY, ENCODER_PROBE_STEPS
from agile_rag.runtime.thread_tuner import ThreadTuner


def bursts(tuner: ThreadTuner, n_bursts: int, per_burst: int, pause_s: float,
           seconds: dict[int, float]) -> list[int]:
    """Forwards of one size in bursts; each takes ``seconds[threads]``. The counts used."""
    now, used = 1000.0, []
    for _ in range(n_bursts):
        for _ in range(per_burst):
            n = tuner.threads(1, now)
            used.append(n)
            now += seconds[n]
            tuner.observe(1, seconds[n], now)
        now += pause_s
    return used


def test_bursts_of_a_few_forwards_find_the_faster_count():
    tuner = ThreadTuner(1, 2, probe_every=ENCODER_PROBE_EVERY, probe_steps=ENCODER_PROBE_STEPS,
                        idle_s=ENCODER_IDLE_S)
    used = bursts(tuner, 4, 3, pause_s=1.5, seconds={1: 0.10, 2: 0.06})
    assert tuner.current == 2, used
    assert used[-3:] == [2, 2, 2]


def test_they_stay_on_the_count_that_is_faster():
    tuner = ThreadTuner(1, 2, probe_every=ENCODER_PROBE_EVERY, probe_steps=ENCODER_PROBE_STEPS,
                        idle_s=ENCODER_IDLE_S)
    used = bursts(tuner, 6, 3, pause_s=1.5, seconds={1: 0.06, 2: 0.10})
    assert tuner.current == 1
    assert used.count(2) <= 6, used          # probes only


def test_the_decode_loops_settings_never_decide_in_such_bursts():
    """(why the encoders have settings of their own)"""
    tuner = ThreadTuner(1, 2)
    bursts(tuner, 6, 3, pause_s=1.5, seconds={1: 0.10, 2: 0.06})
    assert tuner.current == 1 and tuner.switches == 0
