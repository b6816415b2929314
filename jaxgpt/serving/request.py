"""What the serving engine's parts pass around: a request, its sampling settings, its choices (sequences) and how
each ended. Plain data: nothing here imports jax."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jaxgpt.errors import UserValueError

# finish reasons
STOP = "stop"  # end of text (or, in the HTTP layer, a stop string)
LENGTH = "length"  # max_tokens reached
CANCELLED = "cancelled"  # a client went away, a stop string matched
ERROR = "error"  # the engine failed


class InvalidRequest(UserValueError):
    """A request the server refuses; `param` names the request field at fault (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(UserValueError):
    """Too many requests wait already."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's settings; checked where the request comes in (jaxgpt/serving/app.py)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0


@dataclasses.dataclass(eq=False)
class Sequence:
    """One choice of a request: its tokens so far and how it ended."""
    request: Request
    index: int  # the choice number; its key is the request seed's folded with it
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # STOP, LENGTH, CANCELLED or ERROR
    pos: int = 0  # the cache slot its next token writes
    cancelled: bool = False  # set by Engine.cancel, from any thread; the engine's thread ends it
    key_data: object = None  # its random key's data, made by the model runner on first use

    @property
    def cancel_requested(self) -> bool:
        return self.cancelled or self.request.cancelled


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    n: int
    on_token: Callable[[int, int], None]  # (choice, token), from the engine's thread
    on_finish: Callable[[int, str], None]  # (choice, finish_reason)
    sequences: list[Sequence] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
