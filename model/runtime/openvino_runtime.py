"""The vision tower run by OpenVINO on the CPU, in fp32 or int8.

:func:`load_openvino_runtime` returns a :class:`OpenVinoVisionRuntime` for a backbone, a serving
resolution and a set of tapped layers: from the IR cache when a matching entry is there, else
by exporting the tower (fp32) and, for int8, quantizing that fp32 IR with NNCF on calibration
images. Attach it with :meth:`model.backbone.ClipBackbone.set_vision_runtime`; the detector
identity then reports ``runtime="openvino"`` and the precision.

Calibration hook for callers that hold good photos of a product (e.g. the product store)::

    runtime = load_openvino_runtime(backbone, 518, (6, 12, 18, 24), "int8",
                                    calibration_images=good_photos)   # Sequence[PIL.Image]
    backbone.set_vision_runtime(runtime)

Without images, int8 calibrates on the built-in synthetic textures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from model.backbone import ClipBackbone, VisionRuntime
from model.errors import RuntimeNotInstalledError
from model.runtime import OPENVINO_EXTRA_HINT, PRECISIONS
from model.runtime.calibration import (
    DEFAULT_CALIBRATION_SIZE,
    calibration_pixels,
    pixels_digest,
    quantize_int8,
    synthetic_calibration_images,
)
from model.runtime.export import FINAL_CLASS_TOKEN_NAME, INPUT_NAME, export_vision_model, layer_output_name, output_names
from model.runtime.ir_cache import IrCache, IrKey, default_cache_dir, weights_digest

log = logging.getLogger(__name__)


def require_openvino(quantizing: bool = False) -> None:
    """Raise a clear error when OpenVINO (or, to quantize, NNCF) is not installed.

    NNCF is only needed to build an int8 IR: serving one from the cache needs OpenVINO alone.
    """
    missing = []
    for module, needed in (("openvino", True), ("nncf", quantizing)):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RuntimeNotInstalledError(
            f"GENCLIP_RUNTIME=openvino{' with int8 (to quantize)' if quantizing else ''} needs "
            f"{' and '.join(missing)}, which is not installed: {OPENVINO_EXTRA_HINT} "
            "(or set GENCLIP_RUNTIME=torch)."
        )


class OpenVinoVisionRuntime(VisionRuntime):
    """A compiled vision IR behind the :class:`~model.backbone.VisionRuntime` interface.

    Attributes:
        image_size: the resolution the IR was exported at (inputs must match it).
        layers: the tapped blocks the IR outputs (requests must be a subset).
        cache_entry: the IR's cache folder.
        built: ``True`` when this call exported / quantized the IR, ``False`` when it came from the cache.
        build_seconds: export (+ quantization) time when built, else 0.
    """

    name = "openvino"

    def __init__(
        self,
        compiled: Any,
        image_size: int,
        layers: Sequence[int],
        precision: str,
        cache_entry: Path,
        built: bool,
        build_seconds: float = 0.0,
    ) -> None:
        self.precision = precision
        self.image_size = int(image_size)
        self.layers = tuple(layers)
        self.cache_entry = cache_entry
        self.built = built
        self.build_seconds = build_seconds
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one inference at a time
        self._ports = {output.get_any_name(): output for output in compiled.outputs}

    def hidden_states(self, pixels: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        size = (self.image_size, self.image_size)
        if tuple(pixels.shape[-2:]) != size:
            raise ValueError(
                f"the OpenVINO vision IR runs at {self.image_size} px, got {tuple(pixels.shape[-2:])} input"
            )
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(f"the OpenVINO vision IR taps layers {list(self.layers)}, not {missing}")
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:
            result = self._request.infer({INPUT_NAME: array})
        block_outputs = [
            torch.from_numpy(result[self._ports[layer_output_name(layer)]]).to(pixels.device) for layer in layers
        ]
        final_class_token = torch.from_numpy(result[self._ports[FINAL_CLASS_TOKEN_NAME]]).to(pixels.device)
        return block_outputs, final_class_token


def compile_ir(model: Any, threads: int | None) -> Any:
    """Compile for the CPU: fp32 arithmetic outside the quantized ops, latency mode, thread cap.

    ``INFERENCE_PRECISION_HINT=f32`` matters: on CPUs with bf16 support OpenVINO would otherwise
    run the non-quantized ops (and a whole fp32 IR) in bf16.
    """
    import openvino as ov

    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": int(threads or 0),
    }
    return ov.Core().compile_model(model, "CPU", config)


def load_openvino_runtime(
    backbone: ClipBackbone,
    image_size: int,
    layers: Sequence[int],
    precision: str = "fp32",
    cache_dir: Path | None = None,
    calibration_images: Sequence[Image.Image] | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    threads: int | None = None,
    attach: bool = False,
) -> OpenVinoVisionRuntime:
    """The OpenVINO runtime for ``backbone`` at ``image_size`` tapping ``layers``.

    With ``attach``, the runtime is also set on ``backbone`` and the torch weights of its
    vision blocks are freed (:meth:`~model.backbone.ClipBackbone.release_torch_vision_blocks`)
    as soon as the IR is at hand, before it is compiled, so that a serving process never holds
    both at once (ViT-L-14-336: about 1.2 GB less at the peak). Without it the backbone is left
    as it was (benchmarks compare both runtimes on one backbone).

    Args:
        backbone: CPU fp32 backbone (its weights are exported, and digested for the cache key).
        image_size: serving resolution.
        layers: 1-based blocks to tap.
        precision: ``fp32`` or ``int8``.
        cache_dir: IR cache folder (default :func:`~model.runtime.ir_cache.default_cache_dir`).
        calibration_images: int8: the images to calibrate on (all of them are used); ``None``:
            ``calibration_size`` built-in synthetic textures.
        calibration_size: how many synthetic textures when no images are given.
        threads: OpenVINO inference threads (``None``: one per core).
        attach: set the runtime on ``backbone`` and free its torch vision blocks (see above).

    Raises:
        RuntimeNotInstalledError: OpenVINO / NNCF missing.
        RuntimeExportError: export or quantization failed, or the cache folder is not writable.
        CalibrationDataError: no calibration image.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    require_openvino()
    layers = tuple(sorted(set(int(layer) for layer in layers)))
    cache = IrCache(cache_dir or default_cache_dir())
    fp32_key = IrKey(
        model_name=backbone.model_name,
        weights_digest=weights_digest(backbone.clip.visual),
        quick_gelu=bool(backbone.quick_gelu),
        image_size=int(image_size),
        layers=layers,
        precision="fp32",
    )
    pixels = None
    key = fp32_key
    if precision == "int8":
        images = calibration_images
        if images is None:
            images = synthetic_calibration_images(calibration_size, image_size)
        pixels = calibration_pixels(backbone, images, image_size)
        key = replace(fp32_key, precision="int8", calibration_digest=pixels_digest(pixels))

    expected_input = [3, int(image_size), int(image_size)]
    names = output_names(layers)
    with cache.lock(key):
        cached = cache.load(key, expected_input, names)
        if cached is not None:
            log.info("OpenVINO %s vision IR from the cache: %s", precision, cached.path)
            return _finish(backbone, cached.model, threads, attach,
                           image_size, layers, precision, cached.path, False)
        start = time.perf_counter()
        if pixels is None:
            model = export_vision_model(backbone, image_size, layers)
            info: dict[str, Any] = {}
        else:
            require_openvino(quantizing=True)
            with cache.lock(fp32_key):
                fp32 = cache.load(fp32_key, expected_input, names)
                if fp32 is None:
                    fp32_model = export_vision_model(backbone, image_size, layers)
                    cache.store(fp32_key, fp32_model, {"build_seconds": round(time.perf_counter() - start, 1)})
                else:
                    fp32_model = fp32.model
            model = quantize_int8(fp32_model, pixels)
            del fp32_model
            info = {"calibration_images": len(pixels), "calibration_source": "synthetic" if calibration_images is None else "given"}
        seconds = time.perf_counter() - start
        path = cache.store(key, model, {"build_seconds": round(seconds, 1), **info})
    log.info("OpenVINO %s vision IR built in %.1f s: %s", precision, seconds, path)
    return _finish(backbone, model, threads, attach, image_size, layers, precision, path, True, seconds)


def _finish(backbone: ClipBackbone, model: Any, threads: int | None, attach: bool, image_size: int,
            layers: Sequence[int], precision: str, path: Path, built: bool,
            seconds: float = 0.0) -> OpenVinoVisionRuntime:
    """Compile ``model``; with ``attach``, free the torch blocks first and set the runtime."""
    if attach:
        # from here on the torch blocks are gone: if compiling fails, the backbone cannot run images
        backbone.set_vision_runtime(_NotCompiled())
        freed = backbone.release_torch_vision_blocks()
        log.info("torch vision blocks freed (%.2f GB): the OpenVINO IR runs them", freed / 1024**3)
    runtime = OpenVinoVisionRuntime(compile_ir(model, threads), image_size, layers, precision, path, built, seconds)
    if attach:
        backbone.set_vision_runtime(runtime)
    return runtime


class _NotCompiled(VisionRuntime):
    """Runs nothing: set while the IR compiles after the torch blocks were freed (and left when
    compiling failed, the error having been raised to whoever loads the detector)."""

    name = "openvino"
    precision = "not-compiled"

    def hidden_states(self, pixels: torch.Tensor, layers: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise RuntimeError("the OpenVINO vision IR is not compiled (the torch vision blocks were freed for it)")
