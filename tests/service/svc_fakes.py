"""Controllable fake detectors for the service tests (also loaded by worker subprocesses
through ``GENCLIP_DETECTOR_FACTORY=svc_fakes:<factory>`` with this folder on PYTHONPATH)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model.detector import DetectorIdentity, Inspection

POISON_PIXEL = (255, 0, 255)  # top-left pixel of a "poisonous" image


class EchoDetector:
    """score = mean grey level / 255 of the image, map = the grey image / 255.

    So every response is checkable against its own input (no cross-talk between jobs of a
    batch), and the heatmap has the image's exact size.
    """

    def __init__(self, delay_s: float = 0.0, *, poison_raises: bool = True, crash_on_poison: bool = False,
                 marker: str | None = None) -> None:
        self._identity = DetectorIdentity(
            name="echo", backbone="fake-backbone", backbone_weights="none", layers=(1,), image_size=0,
            checkpoint="f" * 64,
        )
        self.delay_s = delay_s
        self.poison_raises = poison_raises
        self.crash_on_poison = crash_on_poison
        self.marker = marker
        self.batch_sizes: list[int] = []
        self.calls = 0
        self.started = threading.Event()
        self.release: threading.Event | None = None

    @property
    def identity(self) -> DetectorIdentity:
        return self._identity

    def inspect(self, images: Sequence[Image.Image], class_names: Sequence[str | None] | None = None):
        self.calls += 1
        self.batch_sizes.append(len(images))
        self.started.set()
        if self.marker:
            with open(self.marker, "a") as fh:
                fh.write(f"{os.getpid()} {len(images)}\n")
        names = list(class_names) if class_names is not None else [None] * len(images)
        poisoned = any(img.convert("RGB").getpixel((0, 0)) == POISON_PIXEL for img in images)
        if poisoned and self.crash_on_poison:
            os._exit(17)  # a worker killed by its input
        if self.release is not None:
            self.release.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if poisoned and self.poison_raises:
            raise ValueError("poisonous image")
        out = []
        for img, name in zip(images, names, strict=True):
            grey = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
            out.append(Inspection(score=float(grey.mean()), anomaly_map=grey, class_label=name or "object",
                                  component_scores={"echo": float(grey.mean()), "half": float(grey.mean() / 2)}))
        return out


def expected_score(img: Image.Image) -> float:
    return float((np.asarray(img.convert("L"), dtype=np.float32) / 255.0).mean())


def echo_factory(settings=None) -> EchoDetector:
    """Worker-subprocess factory: env FAKE_DELAY_S, FAKE_MARKER, FAKE_CRASH_ON_POISON."""
    return EchoDetector(
        float(os.environ.get("FAKE_DELAY_S", "0")),
        crash_on_poison=os.environ.get("FAKE_CRASH_ON_POISON") == "1",
        marker=os.environ.get("FAKE_MARKER"),
    )


def wait_for_file(path: str | Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return Path(path).read_text()
        time.sleep(0.05)
    raise TimeoutError(f"{path} never appeared")
