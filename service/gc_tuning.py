"""Keep the cyclic garbage collector's full passes off the serving path.

A serving process holds a large long-lived heap from start-up on (the detector's torch modules,
the app's routes and schemas). CPython's generation-2 collection walks all of it: measured with
``bench/bench_overload.py`` on the tiny backbone, one full pass held the event loop for 345 ms in
``genclip serve`` with the inline worker and 135 ms in the API alone, and those pauses were the
tail of every latency, 503s included. :func:`freeze_startup_heap` moves everything alive after
start-up into the permanent generation (``gc.freeze``), which the collector no longer scans;
measured the same way, full passes fell to 9-17 ms and the event loop's lag p99 from 334 ms to
10 ms (inline) and 45 ms to 17 ms (API on Redis). Objects frozen this way are still freed by
reference counting; only cycles among them are kept, which is what a start-up heap is meant to be.

Called by the real entry points (``genclip serve`` once the detector is loaded, and ``genclip
worker``), never by :func:`service.app.create_app`, so that a process building many apps (the
tests) does not freeze each one's garbage.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap", "frozen_objects"]

_frozen_count = 0


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object still alive; returns how many are frozen."""
    global _frozen_count
    gc.collect()
    gc.freeze()
    _frozen_count = gc.get_freeze_count()
    return _frozen_count


def frozen_objects() -> int:
    """How many objects :func:`freeze_startup_heap` froze (0 before it ran), in O(1).

    ``/metrics`` reports this, not ``gc.get_freeze_count()``: CPython counts the permanent
    generation by walking it, and with a model's heap frozen that walk held the event loop for
    about 55 ms on every scrape (found with py-spy under ``bench/bench_overload.py``, whose lag
    probe scrapes twice a second: the periodic 50-100 ms 503s of the overload run)."""
    return _frozen_count
