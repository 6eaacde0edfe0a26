"""runtime.batching: in-flight batching over the row step and the decode step generates,
for every sequence, exactly what it generates alone, whatever joins and leaves around it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import prompt_of

from bsbr_export.errors import UserError
from bsbr_export.runtime.batching import Sequences, load_batcher
from bsbr_export.runtime.generate import load_generator
from bsbr_export.runtime.onnx import OnnxRunner

# bsbr-tiny (c = 8): one token, a chunk less one, exactly one chunk, ragged tails, a long one.
PROMPTS = [prompt_of(n, 97) for n in (1, 7, 8, 13, 30, 301)]


def test_greedy_many_at_once_equals_each_alone(tiny_export):
    out, _ = tiny_export
    alone = load_generator(out)
    together = load_batcher(out).generate_many(PROMPTS, max_new_tokens=40)
    for prompt, generation in zip(PROMPTS, together):
        assert generation.prompt == prompt and generation.stopped == "length"
        assert generation.ids == alone.generate(prompt, 40).ids
        assert len(generation.token_seconds) == 39


def test_sampled_many_at_once_draw_what_each_draws_alone(tiny_export):
    """Each sequence its own generator, seeded `seed + i`: the same draws as alone."""
    out, _ = tiny_export
    alone = load_generator(out)
    together = load_batcher(out).generate_many(PROMPTS, 30, temperature=0.9, top_k=20, top_p=0.9, seed=5)
    for i, (prompt, generation) in enumerate(zip(PROMPTS, together)):
        assert generation.ids == alone.generate(prompt, 30, temperature=0.9, top_k=20, top_p=0.9, seed=5 + i).ids


def test_sequences_join_and_leave_between_steps(tiny_export):
    """Two start, two join after 5 steps (one with a 16390-token prompt), lengths differ so
    they leave at different steps (the last slot moves into a leaver's): each as alone."""
    out, _ = tiny_export
    batcher, alone = load_batcher(out), load_generator(out)
    plan = [(PROMPTS[1], 25), (PROMPTS[3], 5)]
    results = [batcher.add(p, n) for p, n in plan]
    for _ in range(5):
        batcher.step()
    later = [(PROMPTS[0], 30), (prompt_of(16390, 97), 20)]
    results += [batcher.add(p, n) for p, n in later]
    sizes = []
    while batcher.active:
        sizes.append(len(batcher.active))
        made = batcher.step()
        assert len(made) == sizes[-1]  # one token for every active sequence, per step
    assert max(sizes) == 3 and sizes[-1] == 1  # the 5-token one left before the others joined
    for (prompt, n), generation in zip(plan + later, results):
        assert generation.ids == alone.generate(prompt, n).ids


def test_stop_ids_end_one_sequence_only(tiny_export):
    out, _ = tiny_export
    free = load_generator(out).generate(PROMPTS[2], 30)
    stop = free.ids[5]
    stopped, other = load_batcher(out).generate_many([PROMPTS[2], PROMPTS[4]], 30, stop=[stop])
    assert stopped.stopped == "stop" and stopped.ids == free.ids[: free.ids.index(stop) + 1]
    assert other.ids == load_generator(out).generate(PROMPTS[4], 30, stop=[stop]).ids


def test_an_export_without_a_row_step_is_refused(tiny_onnx_export, hf_export):
    with pytest.raises(UserError, match="no streaming graphs"):
        load_batcher(tiny_onnx_export)
    with pytest.raises(UserError, match="has no model.rows.onnx"):
        load_batcher(hf_export)  # a module without step_rows: decode graph only


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.add([], 5), "the prompt is empty"),
        (lambda b: b.add([1, 97], 5), "token id 97 is out of range"),
        (lambda b: b.add([1], 0), "max_new_tokens must be an integer >= 1"),
        (lambda b: b.add([1], 5, temperature=-1), "temperature must be a number >= 0"),
    ],
)
def test_a_bad_request_fails_alone(tiny_export, call, message):
    out, _ = tiny_export
    batcher = load_batcher(out)
    running = batcher.add(PROMPTS[3], 12)
    with pytest.raises(UserError, match=message):
        call(batcher)
    while batcher.active:
        batcher.step()
    assert running.ids == load_generator(out).generate(PROMPTS[3], 12).ids


def test_sequences_fed_in_any_mix_equal_the_full_forward(tiny_export):
    """`Sequences` under a random schedule (seeded): sequences open with ragged prompts
    (into the slots closed ones left), are fed one token (row step, rows in any slot order)
    or several (decode step) or nothing, and close when done; each one's logits, all its
    feeds together, equal the full graph's over its whole sequence."""
    out, _ = tiny_export
    sequences, full = Sequences(out), OnnxRunner(out / "model.onnx")
    rng = np.random.default_rng(7)
    ids = {k: rng.integers(0, 97, int(rng.integers(1, 60))).tolist() for k in range(30)}
    pending, fed, logits, row_calls = list(ids), {}, {k: [] for k in ids}, 0
    while pending or len(sequences):
        for _ in range(int(rng.integers(0, 4))):
            if pending:
                key = pending.pop()
                fed[key] = int(rng.integers(1, len(ids[key]) + 1))
                logits[key].append(sequences.open(key, ids[key][: fed[key]]))
        feeds = {}
        for key in rng.permutation([k for k in ids if k in sequences and fed[k] < len(ids[k])]).tolist():
            if rng.random() < 0.7:
                n = 1 if rng.random() < 0.8 else int(rng.integers(1, len(ids[key]) - fed[key] + 1))
                feeds[key] = ids[key][fed[key] : fed[key] + n]
        row_calls += sum(len(v) == 1 for v in feeds.values()) > 1
        for key, out_logits in sequences.feed(feeds).items():
            logits[key].append(out_logits)
            fed[key] += len(feeds[key])
        for key in [k for k in ids if k in sequences and fed[k] == len(ids[k])]:
            sequences.close(key)
    assert row_calls > 10  # the schedule did batch rows
    for key, sequence in ids.items():
        expected = full.infer(
            {"input_ids": np.array([sequence]), "attention_mask": np.ones((1, len(sequence)), np.int64)}
        )["logits"][0]
        assert np.abs(np.concatenate(logits[key]) - expected).max() <= 1e-4, key


def test_a_sequence_not_open_is_refused(tiny_export):
    out, _ = tiny_export
    sequences = Sequences(out)
    sequences.open("a", [1, 2, 3])
    with pytest.raises(UserError, match="sequence 'b' is not open"):
        sequences.feed({"a": [4], "b": [5]})
    with pytest.raises(UserError, match="already open"):
        sequences.open("a", [1])
    assert sequences.position("a") == 3  # nothing was fed


def test_state_bytes_grow_by_one_chunk_row_per_chunk(tiny_export):
    out, _ = tiny_export
    sequences = Sequences(out)
    spec = sequences.spec
    c, layers = spec.chunk_size, spec.num_blocks
    heads, _, head_dim = spec.state.inputs["past.0.keys"][1:]
    state_size = spec.state.inputs["past.0.chunk_states"][3]
    per_chunk = layers * heads * (head_dim + state_size) * 4  # meta_keys + chunk_states, float32
    slot = layers * heads * (2 * (c - 1) * head_dim + head_dim * head_dim) * 4  # keys, values, retrieved
    assert sequences.state_bytes(position=0) == slot
    assert sequences.state_bytes(position=10 * c + 3) == slot + 10 * per_chunk
    sequences.open("a", list(range(2 * c + 1)))
    assert sequences.state_bytes("a") == slot + 2 * per_chunk
