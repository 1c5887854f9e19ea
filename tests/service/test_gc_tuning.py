"""The start-up heap freeze (:mod:`service.gc_tuning`) and what ``/metrics`` reports of it.

Run in a child interpreter: freezing the heap of the pytest process would change every later test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_metrics_report_the_frozen_count_without_walking_the_permanent_generation() -> None:
    # gc.get_freeze_count() walks every frozen object (about 55 ms per /metrics scrape with a
    # model loaded, holding the event loop): after the freeze, /metrics must not call it.
    script = textwrap.dedent("""
        import gc
        from service.gc_tuning import freeze_startup_heap, frozen_objects
        from service.metrics import Metrics

        metrics = Metrics()
        before = [l for l in metrics.render().decode().splitlines() if l.startswith("genclip_gc_frozen_objects ")]
        assert before == ["genclip_gc_frozen_objects 0.0"], before
        keep = [[i] for i in range(50_000)]  # a heap worth freezing
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= 50_000, frozen

        def walk():
            raise AssertionError("/metrics walked the permanent generation")

        gc.get_freeze_count = walk
        line = next(l for l in metrics.render().decode().splitlines() if l.startswith("genclip_gc_frozen_objects "))
        assert float(line.split()[1]) == frozen == frozen_objects(), (line, frozen)
        print("ok", frozen)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
