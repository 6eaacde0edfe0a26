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
        generating = len(batcher.next_token)
        made = batcher.step()
        sizes.append(len(batcher.active))
        assert len(made) >= generating  # every generating sequence got its token
    assert max(sizes) == 3 and sizes[-1] == 0  # the 5-token one left before the others joined
    for (prompt, n), generation in zip(plan + later, results):
        assert generation.ids == alone.generate(prompt, n).ids


def test_a_long_prompt_joins_in_chunk_pieces_without_stalling_the_running(tiny_export):
    """A 3001-token prompt joins three running generations with a budget of 40 tokens: it
    is fed in pieces ending on chunk boundaries, within what the running ones leave of the
    budget, while each of them gets a token every step; all generate what they do alone."""
    out, _ = tiny_export
    batcher, alone = load_batcher(out, token_budget=40), load_generator(out)
    c = batcher.sequences.chunk_size
    running = [batcher.add(p, 200) for p in PROMPTS[1:4]]
    batcher.step()  # nothing was generating: the three prompts went in whole
    assert all(len(g.ids) == 1 for g in running)
    long_prompt = prompt_of(3001, 97)
    joining = batcher.add(long_prompt, 10)
    key = next(k for k, r in batcher.active.items() if r.result is joining)
    positions = [0]
    while key in batcher.prefilling:
        before = [len(g.ids) for g in running]
        batcher.step()
        assert [len(g.ids) for g in running] == [n + 1 for n in before]
        position = batcher.sequences.position(key) if key in batcher.prefilling else len(long_prompt)
        positions.append(position)
    pieces = np.diff(positions)
    assert len(pieces) > 50 and (pieces <= 40 - 3).all()  # the three running took 3 of the 40
    assert all(p % c == 0 for p in positions[1:-1])  # every piece but the last ends on a boundary
    while batcher.active:
        batcher.step()
    assert joining.ids == alone.generate(long_prompt, 10).ids
    for prompt, generation in zip(PROMPTS[1:4], running):
        assert generation.ids == alone.generate(prompt, 200).ids


def test_a_generation_cancelled_mid_prefill_leaves_the_others_as_alone(tiny_export):
    out, _ = tiny_export
    batcher, alone = load_batcher(out, token_budget=16), load_generator(out)
    running = batcher.add(PROMPTS[4], 60)
    batcher.step()
    batcher.add(prompt_of(500, 97), 10)
    gone = next(k for k in batcher.prefilling)
    for _ in range(3):
        batcher.step()
    assert gone in batcher.prefilling
    batcher.cancel(gone)
    assert gone not in batcher.sequences
    later = batcher.add(PROMPTS[2], 20)
    while batcher.active:
        batcher.step()
    assert running.ids == alone.generate(PROMPTS[4], 60).ids
    assert later.ids == alone.generate(PROMPTS[2], 20).ids


def test_streams_closing_their_chunks_together_share_one_decode_call(tiny_export):
    """Eight generations started together close their chunks on the same steps: one
    decode-step call each time, not eight."""
    out, _ = tiny_export
    batcher = load_batcher(out)
    decode, calls = batcher.sequences.decode_runner.infer, []
    batcher.sequences.decode_runner.infer = lambda feeds: calls.append(len(feeds["input_ids"])) or decode(feeds)
    generations = [batcher.add(PROMPTS[3], 30, temperature=0.8, seed=i) for i in range(8)]
    while batcher.active:
        batcher.step()
    assert calls[:8] == [1] * 8  # the prompts, each in its own call (nothing was generating)
    assert calls[8:] == [8] * ((13 + 29) // 8 - 13 // 8)  # then one call of 8 per chunk closed
    alone = load_generator(out)
    for i, generation in enumerate(generations):
        assert generation.ids == alone.generate(PROMPTS[3], 30, temperature=0.8, seed=i).ids


def test_a_bad_token_budget_is_refused(tiny_export):
    with pytest.raises(UserError, match="token_budget must be an integer >= 1"):
        load_batcher(tiny_export[0], token_budget=0)


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
