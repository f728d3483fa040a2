"""The pause between reconnection attempts, shared by the publisher and the consumer."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with jitter: 0.1 s, 0.2 s, ... up to ``maximum``."""

    def __init__(self, start: float = 0.1, maximum: float = 5.0) -> None:
        self.start = start
        self.maximum = maximum
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.start * 2**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.attempt = 0
