"""A perf_counter for tests that moves only when told to, so time sums become exact counts that scheduling noise
on a shared machine cannot move. Patched in as a module's `time`."""

from __future__ import annotations


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def ticking(self, work):
        """`work` that moves the clock one tick each time it finishes."""

        def timed_work(*args, **kwargs):
            result = work(*args, **kwargs)
            self.now += 1.0
            return result

        return timed_work
