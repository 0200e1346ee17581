"""An injected clock for the races of optimize_for_inference: tests never read the wall clock."""
from __future__ import annotations


class StepClock:
    """A clock that advances 1.0 per reading, so every timed call reads 1.0 unless a fake path moves it back."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += 1.0
        return self.now
