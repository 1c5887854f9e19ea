"""Schemathesis, every check, against the real server (guarded uvicorn protocol + app + echo
detector): no server error, no status code or header or body the OpenAPI spec does not declare,
invalid input refused, valid input accepted.

Runs the Schemathesis CLI (``st run --checks all``: examples, coverage and fuzzing phases) in a
subprocess; ``st_hooks`` tells it that an ``image/png`` part is a PNG (see that module). The
example count is bounded to keep CI fast; raise ``GENCLIP_ST_MAX_EXAMPLES`` to dig deeper.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest
from live_server import live_server
from svc_fakes import EchoDetector
from svc_helpers import HERE, settings_for


@pytest.mark.slow
def test_api_matches_its_openapi_spec(tmp_path):
    exe = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if exe is None:
        pytest.skip("schemathesis CLI not installed (pip install schemathesis)")
    settings = settings_for(max_upload_bytes=200_000, job_timeout_s=10)
    examples = os.environ.get("GENCLIP_ST_MAX_EXAMPLES", "40")
    with live_server(settings, detector=EchoDetector()) as (base, _app, _server):
        spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
        env = dict(os.environ, SCHEMATHESIS_HOOKS="st_hooks", NO_COLOR="1",
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        out = subprocess.run(
            [exe, "run", f"{base}/openapi.json", "--checks", "all", "--max-examples", examples, "--workers", "1",
             "--phases", "examples,coverage,fuzzing", "--max-failures", "5"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-8000:]
    operations = sum(len(methods) for methods in spec["paths"].values())
    selected = re.search(r"(\d+) selected / (\d+) total", report)
    assert selected and int(selected.group(1)) == int(selected.group(2)) == operations, report[-3000:]
    assert re.search(r"Tested: \d+", report) and "failed" not in report.split("Test cases:")[-1], report[-3000:]
