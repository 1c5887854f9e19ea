"""Vision runtimes compared: torch fp32 against OpenVINO fp32 / int8 on the same images.

Run through ``bench/bench_model.py --runtime openvino [--precision int8]``. In one process,
on one random-weight backbone (ViT-L-14-336 at 518 px by default):

1. builds the OpenVINO IRs in a fresh cache (export time, int8 calibration + quantization time);
2. times full inspections (baseline detector: preprocessing, vision tower, maps, resize back) per
   image at each batch size, interleaving torch fp32 / OpenVINO fp32 / OpenVINO int8 in every
   round so that load from other processes hits them alike; prints the speed-ups over torch fp32
   (int8 target >= 3x);
3. compares the maps: OpenVINO fp32 against torch (max abs difference), int8 against fp32
   (Pearson over the maps of held-out synthetic textures);
4. measures the serving peak RSS of each runtime in a child process that loads the detector
   (int8 from the warm cache) and inspects one batch.

Random weights: cost and agreement with fp32 only, never quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import pearsonr

from model.backbone import load_backbone
from model.data.synthetic import DEFECT_TYPES, synthesize_sample
from model.runtime.openvino_runtime import load_openvino_runtime
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer
from model.weights_source import BackboneSpec


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def held_out_images(count: int, size: int) -> list[Image.Image]:
    """Synthetic test textures (good and defective), none of them in the calibration set."""
    categories = ("carpet_like", "grid_like", "wood_like", "leather_like")
    streams = ("test/good", *DEFECT_TYPES)
    return [
        Image.fromarray(synthesize_sample(categories[i % 4], streams[i % len(streams)], 100 + i, size)[1])
        for i in range(count)
    ]


def serving_rss(args: argparse.Namespace, runtime: str, precision: str, cache_dir: Path) -> tuple[float, float]:
    """(peak RSS in GB, start-up seconds) of a fresh process that builds the detector and inspects one batch.

    The peak is the child's ``VmHWM``: ``ru_maxrss`` would report the parent's peak, which a
    forked child inherits.
    """
    code = f"""
import time, torch
start = time.perf_counter()
from model.factory import DetectorConfig, build_detector
from model.weights_source import BackboneSpec
from bench.bench_runtime import held_out_images
detector = build_detector(DetectorConfig(detector="baseline", backbone=BackboneSpec({args.backbone!r}, "random", quick_gelu=True),
    image_size={args.image_size}, device="cpu", runtime={runtime!r}, precision={precision!r},
    runtime_cache_dir={str(cache_dir)!r}, calibration_size={args.calibration_size}, threads={args.threads!r}))
startup = time.perf_counter() - start
if {args.threads!r}: torch.set_num_threads({args.threads!r})
detector.inspect(held_out_images({max(args.batches)}, {args.image_size}))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(int(status["VmHWM"].split()[0]) / 1024**2, startup)
"""
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    peak, startup = result.stdout.strip().splitlines()[-1].split()
    return float(peak), float(startup)


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="genclip_ov_bench_"))
    backbone = load_backbone(BackboneSpec(args.backbone, "random", quick_gelu=True))
    layers = tuple(round(backbone.num_blocks * q / 4) for q in (1, 2, 3, 4))
    scorer = create_scorer("baseline", backbone, layers, args.image_size)
    torch_runtime = backbone.vision_runtime
    print(f"{args.backbone} (random weights) at {args.image_size} px, layers {layers}, CPU, "
          f"{args.threads or 'all'} threads; IR cache {cache_dir}")

    runtimes = {"torch-fp32": torch_runtime}
    builds = {}
    precisions = ["fp32", "int8"] if args.precision == "int8" else ["fp32"]
    for precision in precisions:
        runtime = load_openvino_runtime(backbone, args.image_size, layers, precision, cache_dir,
                                        calibration_size=args.calibration_size, threads=args.threads)
        meta = json.loads((runtime.cache_entry / "meta.json").read_text())
        builds[precision] = runtime.build_seconds if runtime.built else float(meta.get("build_seconds", 0.0))
        print(f"OpenVINO {precision} IR {'built' if runtime.built else 'from the cache'}: "
              f"{builds[precision]:.1f} s"
              + (f" (calibration on {args.calibration_size} synthetic textures + NNCF, fp32 export not included)"
                 if precision == "int8" else " (torch.export + convert)"), flush=True)
        runtimes[f"openvino-{precision}"] = runtime
    detector = ScorerDetector(scorer)

    def use(name: str) -> None:
        backbone.set_vision_runtime(runtimes[name])

    rows = []
    maps: dict[str, np.ndarray] = {}
    for batch in args.batches:
        images = held_out_images(batch, args.image_size)
        for name in runtimes:  # warm-up: allocator, text cache, OpenVINO first inference
            use(name)
            results = detector.inspect(images)
            maps[f"{name}/{batch}"] = np.stack([r.anomaly_map for r in results])
        timings: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(args.repeats):
            for name in runtimes:
                use(name)
                start = time.perf_counter()
                detector.inspect(images)
                timings[name].append(time.perf_counter() - start)
        per_image = {name: statistics.median(values) / batch for name, values in timings.items()}
        row = {"batch": batch, **{f"{name}_s_per_image": round(value, 3) for name, value in per_image.items()}}
        reference = per_image["torch-fp32"]
        line = f"batch {batch}: torch fp32 {reference:7.2f} s/image"
        for name in runtimes:
            if name == "torch-fp32":
                continue
            row[f"speedup_{name}"] = round(reference / per_image[name], 2)
            line += f" | {name} {per_image[name]:6.2f} s/image = {reference / per_image[name]:.2f}x"
        rows.append(row)
        print(line + (" (int8 target >= 3x)" if "openvino-int8" in runtimes else ""), flush=True)

    agreement = {}
    torch_maps = np.concatenate([maps[f"torch-fp32/{b}"] for b in args.batches])
    fp32_maps = np.concatenate([maps[f"openvino-fp32/{b}"] for b in args.batches])
    agreement["fp32_max_abs_map_diff"] = float(np.abs(fp32_maps - torch_maps).max())
    print(f"maps: OpenVINO fp32 vs torch fp32 max |diff| {agreement['fp32_max_abs_map_diff']:.2e} (target <= 1e-4)")
    if "openvino-int8" in runtimes:
        int8_maps = np.concatenate([maps[f"openvino-int8/{b}"] for b in args.batches])
        agreement["int8_map_pearson"] = float(pearsonr(fp32_maps.ravel(), int8_maps.ravel())[0])
        agreement["int8_map_pearson_min_per_image"] = float(
            min(pearsonr(a.ravel(), b.ravel())[0] for a, b in zip(fp32_maps, int8_maps))
        )
        print(f"maps: int8 vs fp32 Pearson {agreement['int8_map_pearson']:.4f} over {len(int8_maps)} held-out "
              f"synthetic images (target >= 0.99; lowest single image {agreement['int8_map_pearson_min_per_image']:.4f})")
    print(f"peak RSS of this process (torch model, exports, quantization, all runtimes): {peak_rss_gb():.2f} GB",
          flush=True)

    rss, startup = {}, {}
    if not args.no_serving_rss:
        for runtime_name, precision in (("torch", "fp32"), *(("openvino", p) for p in precisions)):
            name = f"{runtime_name}-{precision}"
            peak, seconds = serving_rss(args, runtime_name, precision, cache_dir)
            rss[name], startup[name] = round(peak, 2), round(seconds, 1)
        print("serving, fresh process (IR from the cache; load + one batch of "
              f"{max(args.batches)}): " + ", ".join(
                  f"{name} peak RSS {rss[name]:.2f} GB, start-up {startup[name]:.0f} s" for name in rss))
    report = {
        "backbone": args.backbone, "weights": "random", "image_size": args.image_size, "layers": list(layers),
        "threads": args.threads, "repeats": args.repeats, "calibration_size": args.calibration_size,
        "build_seconds": builds, "timings": rows, "agreement": agreement,
        "peak_rss_gb_process": round(peak_rss_gb(), 2), "serving_peak_rss_gb": rss, "serving_startup_s": startup,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
