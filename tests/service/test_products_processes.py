"""Products across real processes: two API processes and a worker process on Redis and
PostgreSQL (a change made through one API is used by inspections through the other within
2 s), and the ``genclip products`` / ``predict --product`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from product_helpers import good_files, good_photo
from svc_helpers import ROOT, files, free_port, image_bytes, subprocess_env

TINY = {"GENCLIP_BACKBONE": "tiny-clip-random", "GENCLIP_BACKBONE_WEIGHTS": "random", "GENCLIP_DETECTOR": "baseline",
        "GENCLIP_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1", "GENCLIP_TORCH_THREADS": "1"}


def _wait_http(url: str, path: str, timeout: float = 60.0, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=2).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}{path} never answered {status}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_change_through_one_api_reaches_inspections_through_another(redis_url, prefix, postgres_url, tmp_path) -> None:
    env = subprocess_env(GENCLIP_REDIS_URL=redis_url, GENCLIP_REDIS_PREFIX=prefix, GENCLIP_DATABASE_URL=postgres_url,
                         GENCLIP_HEARTBEAT_INTERVAL_S="0.2", GENCLIP_HEARTBEAT_TTL_S="2", GENCLIP_CALIBRATION_WAIT_S="60",
                         **TINY)
    ports = [free_port(), free_port()]
    logs = [open(tmp_path / name, "w+") for name in ("worker.log", "api_a.log", "api_b.log")]
    procs = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker"], cwd=ROOT, env=env,
                              stdout=logs[0], stderr=subprocess.STDOUT)]
    procs += [subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
              for port, log in zip(ports, logs[1:])]
    a, b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for url in (a, b):
            _wait_http(url, "/ready", timeout=90)
        photo = image_bytes(good_photo(99))

        def inspect_b() -> httpx.Response:
            return httpx.post(b + "/inspect", files=files(photo), data={"product": "carpet"}, timeout=30)

        assert httpx.put(a + "/products/carpet", json={}, timeout=10).status_code == 201
        first = httpx.post(a + "/products/carpet/good", files=good_files(5), timeout=120)
        assert first.status_code == 200, first.text
        assert first.json()["product"]["reference"]["version"] == 1
        answer = inspect_b()
        assert answer.status_code == 200, answer.text
        assert answer.json()["reference_version"] == 1 and answer.json()["threshold_source"] == "product"

        second = httpx.post(a + "/products/carpet/good", files=good_files(3, start=20), timeout=120)
        assert second.status_code == 200 and second.json()["product"]["reference"]["version"] == 2
        changed_at = time.monotonic()
        while inspect_b().json()["reference_version"] != 2:
            assert time.monotonic() - changed_at < 2.0, "API B still inspects with the old reference after 2 s"
            time.sleep(0.05)
        new_threshold = second.json()["product"]["image_threshold"]
        assert inspect_b().json()["threshold"] == pytest.approx(new_threshold)

        assert httpx.put(a + "/products/carpet", json={"few_shot": False}, timeout=10).status_code == 200
        changed_at = time.monotonic()
        while inspect_b().json()["reference_version"] is not None:
            assert time.monotonic() - changed_at < 2.0, "few_shot=false not seen by API B within 2 s"
            time.sleep(0.05)

        assert httpx.delete(a + "/products/carpet", timeout=10).status_code == 204
        changed_at = time.monotonic()
        while inspect_b().status_code != 404:
            assert time.monotonic() - changed_at < 2.0, "deleted product still served by API B after 2 s"
            time.sleep(0.05)
    finally:
        for proc in procs:
            _stop(proc)
        for log in logs:
            log.close()


def test_products_cli_add_list_show_predict_delete(tmp_path, monkeypatch, capsys) -> None:
    """``genclip products add`` for real in a subprocess (the console entry, progress, report),
    then the other commands through the same entry point in this process (no torch start-up
    cost per command)."""
    from service.cli import main

    database = f"sqlite:///{tmp_path / 'genclip.db'}"
    env = subprocess_env(GENCLIP_DATABASE_URL=database, **TINY)
    for key, value in env.items():
        if key.startswith("GENCLIP_"):
            monkeypatch.setenv(key, value)
    good = tmp_path / "good"
    good.mkdir()
    for index in range(6):
        good_photo(index).save(good / f"part_{index}.png")

    added = subprocess.run([sys.executable, "-m", "service.cli", "products", "add", "carpet", "--good", str(good),
                            "--false-reject-rate", "0.05", "--report", str(tmp_path / "report.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stderr
    assert "calibrating carpet" in added.stderr, "progress bar on stderr"
    report = json.loads(added.stdout)
    assert report["image_count"] == 6 and report["stored"] is True
    assert json.loads((tmp_path / "report.json").read_text())["image_threshold"] == report["image_threshold"]

    def genclip(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = genclip("products", "list")
    assert code == 0 and "carpet" in out and "ready" in out
    code, out, _ = genclip("products", "show", "carpet")
    shown = json.loads(out)
    assert shown["image_count"] == 6 and shown["false_reject_rate"] == 0.05 and shown["reference"]["version"] == 1

    image = tmp_path / "part.png"
    good_photo(77).save(image)
    code, _, err = genclip("predict", str(image), "--product", "carpet", "--out", str(tmp_path / "out"))
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"][0]
    assert record["product"] == "carpet" and record["threshold_source"] == "product"
    assert record["threshold"] == pytest.approx(shown["image_threshold"])
    assert set(record["component_scores"]) >= {"zero_shot", "few_shot"}

    (good / "notes.png").write_bytes(b"not an image at all")
    code, _, err = genclip("products", "add", "carpet", "--good", str(good), "--no-progress")
    assert code == 2 and "notes.png" in err
    assert json.loads(genclip("products", "show", "carpet")[1])["image_count"] == 6, "nothing stored"

    code, _, err = genclip("predict", str(image), "--product", "ghost", "--out", str(tmp_path / "o2"))
    assert code != 0 and "ghost" in err
    assert genclip("products", "delete", "carpet")[0] == 0
    assert genclip("products", "show", "carpet")[0] == 2
    assert genclip("products", "add", "Bad Name")[0] == 2
