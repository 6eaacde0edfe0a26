"""A `Batcher` driven by a thread of its own, for servers: request threads (or an event
loop) submit generations and hear each token through a callback, as it is made.

    loop = ServingLoop(load_batcher("export/bsbr-stdlib")).start()
    ticket = loop.submit(loop.batcher.prompts.request("def main(", 20), on_event)
    ...
    loop.cancel(ticket)  # the client went away: its state is freed at the next iteration
    loop.stop()

Everything that touches the batcher's sequences (opening one within the `Limits`, each
`step`, cancelling) happens on the loop thread, so the batcher needs no lock; `submit`
and `cancel` only queue. Numpy and onnxruntime only, like `runtime.batching`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from bsbr_export.errors import UserError
from bsbr_export.runtime.batching import Batcher, Limits
from bsbr_export.runtime.requests import Request, Token

# on_event(token, error): a token as it is made (the request says when it was the last),
# or the one error that ends the request: a UserError (Busy for a full server: retry) that
# refused it, or the GenerationFailed of a step that failed.
Listener = Callable[[Token | None, Exception | None], None]


class GenerationFailed(RuntimeError):
    """A batcher step failed: every request it carried ends with this error."""


@dataclass(eq=False)
class Ticket:
    """One submitted generation: its checked request, who hears its tokens, and how the
    loop learns that its client has gone (`cancel`, or a server's own `client_gone` check)."""

    request: Request
    listener: Listener
    client_gone: Callable[[], bool] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def gone(self) -> bool:
        return self.cancelled.is_set() or (self.client_gone is not None and self.client_gone())


class ServingLoop:
    """One thread that starts submitted generations within `limits` and runs the batcher's
    iterations while any is active, telling each listener about its tokens."""

    def __init__(self, batcher: Batcher, limits: Limits | None = None) -> None:
        self.batcher = batcher
        self.limits = limits or Limits()
        self.inbox: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self.tickets: dict[int, Ticket] = {}  # batcher key -> its ticket
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bsbr-serving", daemon=True)

    def start(self) -> ServingLoop:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.thread.join(timeout)

    def submit(self, request: Request, listener: Listener, client_gone: Callable[[], bool] | None = None) -> Ticket:
        """Queue a checked request; it joins at the loop's next iteration. `client_gone`,
        asked every iteration, says when its client went away (a Triton sender's
        `is_cancelled`)."""
        ticket = Ticket(request, listener, client_gone)
        self.inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a generation whose client went away (freed at the next iteration)."""
        ticket.cancelled.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                # Block while nothing runs; else take what queued since the last iteration.
                ticket = self.inbox.get(timeout=0.1) if not self.tickets else self.inbox.get_nowait()
            except queue.Empty:
                ticket = None
            while ticket is not None:
                self._open(ticket)
                try:
                    ticket = self.inbox.get_nowait()
                except queue.Empty:
                    ticket = None
            for key in [k for k, t in self.tickets.items() if t.gone()]:
                self._drop(key)
            if self.tickets:
                self._step()

    def _open(self, ticket: Ticket) -> None:
        if ticket.gone():
            return
        request = ticket.request
        prompt = len(request.result.prompt)
        try:
            self.limits.check_open(self.batcher.sequences, prompt, prompt + request.max_new_tokens)
        except UserError as exc:
            ticket.listener(None, exc)
            return
        self.tickets[self.batcher.start(request)] = ticket

    def _step(self) -> None:
        try:
            made = self.batcher.step()
        except Exception as exc:  # a failed step fails the requests it carried, not the server
            for key, ticket in list(self.tickets.items()):
                if key in self.batcher.active:
                    self.batcher.cancel(key)
                ticket.listener(None, GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
            self.tickets.clear()
            return
        for key, token in made:
            ticket = self.tickets[key]
            if ticket.request.done:
                del self.tickets[key]
            try:
                ticket.listener(token, None)
            except Exception:  # the listener could not reach its client: free the sequence
                if key in self.tickets:
                    self._drop(key)

    def _drop(self, key: int) -> None:
        self.batcher.cancel(key)
        del self.tickets[key]
