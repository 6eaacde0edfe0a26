"""runtime.serving: the loop thread every server runs tells each listener its tokens as
they are made (equal to generating alone), refuses past the limits without disturbing
the others, and frees a sequence whose client went away."""

from __future__ import annotations

import threading

from conftest import prompt_of

from bsbr_export.errors import Busy, UserError
from bsbr_export.runtime.batching import Limits, load_batcher
from bsbr_export.runtime.generate import load_generator
from bsbr_export.runtime.serving import ServingLoop


class Heard:
    """A listener: the tokens it heard, its error, and an event set at the end."""

    def __init__(self, request, fail_after: int | None = None) -> None:
        self.request, self.fail_after = request, fail_after
        self.ids, self.error, self.ended = [], None, threading.Event()

    def __call__(self, token, error) -> None:
        if error is not None:
            self.error = error
            self.ended.set()
            return
        if self.fail_after is not None and len(self.ids) == self.fail_after:
            self.ended.set()
            raise ConnectionError("client gone")
        self.ids.append(token.id)
        if self.request.done:
            self.ended.set()


def test_listeners_hear_what_each_generates_alone(tiny_export):
    out, _ = tiny_export
    loop = ServingLoop(load_batcher(out, token_budget=24)).start()
    try:
        plans = [(prompt_of(n, 97), 30 + n) for n in (5, 13, 300, 1)]
        heard = []
        for prompt, tokens in plans:
            request = loop.batcher.prompts.request(prompt, tokens, temperature=0.7, seed=tokens)
            heard.append(Heard(request))
            loop.submit(request, heard[-1])
        assert all(h.ended.wait(60) for h in heard)
    finally:
        loop.stop()
    alone = load_generator(out)
    for (prompt, tokens), h in zip(plans, heard):
        assert h.error is None and h.ids == alone.generate(prompt, tokens, temperature=0.7, seed=tokens).ids


def test_a_limit_refuses_one_and_the_others_go_on(tiny_export):
    out, _ = tiny_export
    loop = ServingLoop(load_batcher(out), Limits(max_sequences=1, max_prompt_tokens=50)).start()
    try:
        first = loop.batcher.prompts.request(prompt_of(9, 97), 200)
        too_long = loop.batcher.prompts.request(prompt_of(51, 97), 5)
        second = loop.batcher.prompts.request(prompt_of(9, 97), 5)
        heard = [Heard(r) for r in (first, too_long, second)]
        for request, h in zip((first, too_long, second), heard):
            loop.submit(request, h)
        assert all(h.ended.wait(60) for h in heard)
    finally:
        loop.stop()
    # The prompt over a limit is the request's own fault; a full server is Busy (retry later).
    assert type(heard[1].error) is UserError and "over this model's max_prompt_tokens (50)" in str(heard[1].error)
    assert isinstance(heard[2].error, Busy) and "max_sequences: retry when one ends" in str(heard[2].error)
    assert heard[0].error is None and heard[0].ids == load_generator(out).generate(prompt_of(9, 97), 200).ids


def test_a_client_gone_frees_its_sequence(tiny_export):
    """One client goes away (its server's check says so), one listener fails to send: both
    sequences are freed, and the third generation ends as alone."""
    out, _ = tiny_export
    loop = ServingLoop(load_batcher(out)).start()
    gone = threading.Event()
    try:
        requests = [loop.batcher.prompts.request(prompt_of(n, 97), 500) for n in (3, 4, 5)]
        heard = [Heard(requests[0]), Heard(requests[1], fail_after=10), Heard(requests[2])]
        loop.submit(requests[0], heard[0], gone.is_set)
        loop.submit(requests[1], heard[1])
        loop.submit(requests[2], heard[2])
        assert heard[1].ended.wait(60)
        gone.set()
        assert heard[2].ended.wait(60)
    finally:
        loop.stop()
    assert len(loop.batcher.sequences) == 0 and not loop.tickets
    assert len(heard[1].ids) == 10 and len(heard[0].ids) < 500
    assert heard[2].ids == load_generator(out).generate(prompt_of(5, 97), 500).ids
