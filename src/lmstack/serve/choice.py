"""The text of one choice as its tokens arrive: incremental decoding, stop strings, log-probabilities.

Stop strings are matched on the decoded text, so across token boundaries, by the same watcher that
`generate_text` uses; text that could still turn out to begin a stop string is held back, so a stream
never shows text it would have to retract.
"""

from __future__ import annotations

from lmstack.infer.engine import TokenEvent
from lmstack.infer.generate import StopStringWatcher


class ChoiceText:
    def __init__(self, tokenizer, stops: list[str], stop_ids: frozenset[int]):
        self.stop_ids = stop_ids
        self._pieces: list[str] = []
        self._watcher = StopStringWatcher(tokenizer, stops, 0, lambda _row, piece: self._pieces.append(piece))
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stopped_by_string = False  # the engine must be told to stop this request

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: TokenEvent) -> tuple[str, list[tuple[int, float, list]]]:
        """Consume one event; returns the newly final text and the new (token, logprob, top) entries."""
        entries = []
        if event.token is not None:
            self.tokens.append(event.token)
            if event.logprob is not None:
                entries.append((event.token, event.logprob, event.top_logprobs or []))
            if self._watcher.push(event.token, event.token in self.stop_ids):
                self.finish_reason, self.stopped_by_string = "stop", not event.finished
        if self.finish_reason is None and event.finished:
            self.finish_reason = "length" if event.finish_reason == "cancelled" else event.finish_reason
        if self.done:
            self.text = self._watcher.finish()
        delta, self._pieces = "".join(self._pieces), []
        return delta, entries
