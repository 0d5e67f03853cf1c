"""JSON mode (`response_format: {"type": "json_object"}`) as a logits processor above the engine.

Constrained decoding in the spirit of Willard & Louf 2023 (Outlines) and llama.cpp's grammars, kept
small: a pushdown automaton over the bytes of the output accepts exactly the prefixes of JSON texts
whose top-level value is an object. At each step a token is allowed only if its bytes keep the prefix
valid, and only if what it leaves open can still be closed within the remaining token budget (each
closing character is at most one token, since a byte-level vocabulary holds every single byte), with
one token left for EOS. EOS is allowed only once the object is complete. So a request that ends with
finish reason `stop` parses as JSON, and one that runs close to `max_tokens` closes its open strings,
arrays and objects in time.

States are small hashable tuples (mode, stack, aux); the allowed tokens of a state are computed once
over the vocabulary and cached, since the same states recur (inside a string the state never changes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

State = tuple  # (mode, stack: str of "o"/"a", aux)
START: State = ("start", "", None)
_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_NUMBER_END_OK = ("zero", "int", "frac", "exp_digits")  # a number may end in these modes


def _after_value(stack: str) -> State:
    return ("done", "", None) if not stack else ("after", stack, None)


def _value_start(byte: int, stack: str) -> State | None:
    if byte == ord('"'):
        return ("str", stack, False)
    if byte == ord("{"):
        return ("key_or_end", stack + "o", None)
    if byte == ord("["):
        return ("value_or_end", stack + "a", None)
    if byte == ord("-"):
        return ("minus", stack, None)
    if byte == ord("0"):
        return ("zero", stack, None)
    if byte in _DIGITS:
        return ("int", stack, None)
    literal = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}.get(byte)
    return None if literal is None else ("lit", stack, literal)


def step(state: State, byte: int) -> State | None:
    """The state after one more byte, or None if the prefix stops being a prefix of a JSON object."""
    mode, stack, aux = state
    if mode in ("str", "esc", "u"):
        return _string_step(state, byte)
    if mode in ("minus", "zero", "int", "dot", "frac", "exp", "exp_sign", "exp_digits"):
        return _number_step(state, byte)
    if mode == "lit":
        if byte != aux[0]:
            return None
        return ("lit", stack, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if mode == "done":
        return None  # only EOS may follow the complete object
    if byte in _WS:
        return state
    if mode == "start":
        return ("key_or_end", "o", None) if byte == ord("{") else None
    if mode in ("key_or_end", "key"):
        if byte == ord('"'):
            return ("str", stack, True)
        return _after_value(stack[:-1]) if mode == "key_or_end" and byte == ord("}") else None
    if mode == "colon":
        return ("value", stack, None) if byte == ord(":") else None
    if mode == "value":
        return _value_start(byte, stack)
    if mode == "value_or_end":
        return _after_value(stack[:-1]) if byte == ord("]") else _value_start(byte, stack)
    if mode == "after":
        top = stack[-1]
        if byte == ord(","):
            return ("key", stack, None) if top == "o" else ("value", stack, None)
        if byte == ord("}" if top == "o" else "]"):
            return _after_value(stack[:-1])
        return None
    raise AssertionError(mode)


def _string_step(state: State, byte: int) -> State | None:
    mode, stack, aux = state
    if mode == "esc":
        if byte == ord("u"):
            return ("u", stack, (aux, 4))
        return ("str", stack, aux) if byte in _ESCAPES else None
    if mode == "u":
        is_key, left = aux
        if byte not in _HEX:
            return None
        return ("str", stack, is_key) if left == 1 else ("u", stack, (is_key, left - 1))
    if byte == ord('"'):
        return ("colon", stack, None) if aux else _after_value(stack)
    if byte == ord("\\"):
        return ("esc", stack, aux)
    return None if byte < 0x20 else state  # control characters must be escaped inside strings


def _number_step(state: State, byte: int) -> State | None:
    mode, stack, _ = state
    digit = byte in _DIGITS
    if mode == "minus":
        return ("zero", stack, None) if byte == ord("0") else ("int", stack, None) if digit else None
    if mode in ("dot", "exp_sign"):
        return (("frac" if mode == "dot" else "exp_digits"), stack, None) if digit else None
    if mode == "exp":
        if byte in b"+-":
            return ("exp_sign", stack, None)
        return ("exp_digits", stack, None) if digit else None
    if digit and mode != "zero":
        return state
    if byte == ord(".") and mode in ("zero", "int"):
        return ("dot", stack, None)
    if byte in b"eE" and mode in ("zero", "int", "frac"):
        return ("exp", stack, None)
    return step(_after_value(stack), byte)  # the number ended; the byte starts what follows


def closing_cost(state: State) -> int:
    """The fewest characters that complete the object from `state` (e.g. `"`, `:0`, `}`, `]`)."""
    mode, stack, aux = state
    open_ = len(stack)
    if mode == "done":
        return 0
    if mode == "start":
        return 2  # {}
    if mode in ("key_or_end", "value_or_end", "after", *_NUMBER_END_OK):
        return open_
    if mode == "key":
        return 4 + open_  # "":0
    if mode == "colon":
        return 2 + open_  # :0
    if mode in ("value", "minus", "dot", "exp", "exp_sign"):
        return 1 + open_
    if mode == "lit":
        return len(aux) + open_
    if mode == "str":
        return (3 if aux else 1) + open_  # a key still needs ":0
    if mode == "esc":
        return 1 + closing_cost(("str", stack, aux))
    if mode == "u":
        return aux[1] + closing_cost(("str", stack, aux[0]))
    raise AssertionError(mode)


def feed(state: State | None, data: bytes) -> State | None:
    for byte in data:
        if state is None:
            return None
        state = step(state, byte)
    return state


class JsonVocabulary:
    """Each token's bytes (None for special tokens) and, per automaton state, the tokens that keep the
    prefix valid with the closing cost they leave. Shared by all requests of one server."""

    def __init__(self, token_bytes: list[bytes | None]):
        self.token_bytes = token_bytes
        self._table: dict[State, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> JsonVocabulary:
        special = set(tokenizer.special_tokens.values())
        n = tokenizer.vocab_size
        return cls([None if i in special or i >= n else tokenizer.id_to_bytes(i) for i in range(vocab_size)])

    def transitions(self, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, closing cost after each) for the tokens allowed from `state`."""
        if state not in self._table:
            ids, costs = [], []
            for token, data in enumerate(self.token_bytes):
                if not data:
                    continue
                after = feed(state, data)
                if after is not None:
                    ids.append(token)
                    costs.append(closing_cost(after))
            self._table[state] = (torch.tensor(ids, dtype=torch.long), torch.tensor(costs, dtype=torch.long))
        return self._table[state]


class JsonObjectProcessor:
    """A logits processor `(generated ids, logits (V,)) -> logits` for one request of `budget` tokens."""

    def __init__(self, vocabulary: JsonVocabulary, eos_ids: Iterable[int], budget: int):
        self.vocabulary, self.budget = vocabulary, budget
        self.eos_ids = sorted(set(eos_ids))
        self.state: State | None = START
        self.consumed = 0

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self.consumed :]:
            if token not in self.eos_ids:
                self.state = feed(self.state, self.vocabulary.token_bytes[token] or b"\0")
        self.consumed = len(generated)
        if self.state is None:  # unreachable unless the budget forced an invalid token: stop constraining
            return logits
        if self.state[0] == "done":
            allowed = torch.tensor(self.eos_ids, dtype=torch.long)
        else:
            ids, costs = self.vocabulary.transitions(self.state)
            left_after = self.budget - len(generated) - 1  # tokens left once this one is chosen
            fits = ids[costs + 1 <= left_after]  # + 1: EOS must still fit after the closing characters
            allowed = fits if len(fits) else ids  # too late to close: stay valid, end by length
        if not len(allowed):
            return logits
        allowed = allowed.to(logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out
