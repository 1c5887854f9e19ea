"""Model cost on this machine: full inspections against the bare vision forward.

For each detector (GenCLIP with both branches and CNF, ViP2-CLIP, the baseline) and batch
size, times ``detector.inspect`` on 518 px images (preprocessing, prompts, text passes, maps,
resize back) against the bare vision-tower forward on the same batch, and prints the ratio
(target <= 1.20) plus the process's peak RSS (target <= 3.5 GB at batch 4).

Random backbone weights: only the cost is measured here, never the quality.

    python bench/bench_model.py                      # ViT-L-14-336 at 518, batches 1 and 4
    python bench/bench_model.py --backbone tiny-clip-random --image-size 64 --repeats 5

With ``--runtime openvino`` it compares vision runtimes instead (see ``bench/bench_runtime.py``):
torch fp32 against OpenVINO fp32 (and int8 with ``--precision int8``), time per image of an
inspection, speed-ups, export time, map agreement and peak RSS:

    python bench/bench_model.py --runtime openvino --precision int8      # ViT-L-14-336, 518 px
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from model.backbone import load_backbone
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer
from model.weights_source import BackboneSpec


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(function, repeats: int) -> float:  # type: ignore[no-untyped-def]
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--detectors", nargs="+", default=["genclip", "vip2clip", "baseline"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this file")
    parser.add_argument("--runtime", choices=["torch", "openvino"], default="torch",
                        help="openvino: compare vision runtimes (torch fp32 vs OpenVINO) instead of detectors")
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="with --runtime openvino: also build and time the int8 IR")
    parser.add_argument("--cache-dir", default=None, help="OpenVINO IR cache (default: a fresh temporary folder)")
    parser.add_argument("--calibration-size", type=int, default=16, help="int8: synthetic calibration images")
    parser.add_argument("--no-serving-rss", action="store_true", help="skip the child processes measuring RSS")
    parser.add_argument("--in-process", action="store_true",
                        help="measure the given detectors in this process (default: one process per detector, "
                             "so each peak RSS is that detector's own)")
    args = parser.parse_args()
    if args.runtime == "openvino":
        from bench_runtime import run as run_runtime_comparison  # bench/ is on sys.path as the script's folder

        run_runtime_comparison(args)
        return
    if not args.in_process:
        run_isolated(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(args.backbone, "random", quick_gelu=True))
    layers = tuple(round(backbone.num_blocks * q / 4) for q in (1, 2, 3, 4))
    detectors = {
        name: ScorerDetector(create_scorer(name, backbone, layers, args.image_size)) for name in args.detectors
    }
    print(f"{args.backbone} (random weights) at {args.image_size} px, layers {layers}, "
          f"fp32 CPU, {torch.get_num_threads()} threads; median of {args.repeats}")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        images = [
            Image.fromarray(rng.integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8))
            for _ in range(batch)
        ]
        names = ["metal nut", "screw", "bottle", "pcb"][:batch] * (batch // 4 + 1)
        names = names[:batch]
        pixels = backbone.preprocess(images, args.image_size)

        def bare() -> None:
            with torch.inference_mode():
                backbone.encode_image(pixels, [backbone.num_blocks])

        bare()  # warm-up (allocator, positional-embedding resize)
        for name, detector in detectors.items():
            detector.inspect(images, names)  # warm-up: caches text of these names
            # Interleave to cancel drift from other load on the machine.
            bare_s, full_s = [], []
            for _ in range(args.repeats):
                bare_s.append(timed(bare, 1))
                full_s.append(timed(lambda: detector.inspect(images, names), 1))
            bare_time, full_time = statistics.median(bare_s), statistics.median(full_s)
            # The same cost measured by parts: everything an inspection adds to the vision pass
            # (preprocessing, prompts, text passes, CNF, maps, resize back). Short timings, so
            # far less exposed to other load on the machine than the two long ones above.
            scorer = detector.scorer
            with torch.inference_mode():
                features = backbone.encode_image(pixels, scorer.layers)

                def added_work() -> None:
                    backbone.preprocess(images, args.image_size)
                    result = scorer.score_features(features, names)
                    for index, image in enumerate(images):
                        torch.nn.functional.interpolate(
                            result.maps[index : index + 1, None], size=image.size[::-1], mode="bilinear"
                        ).cpu().numpy()

                added_time = timed(added_work, 5)
            row = {
                "detector": name,
                "batch": batch,
                "bare_vision_s": round(bare_time, 3),
                "inspection_s": round(full_time, 3),
                "ratio": round(full_time / bare_time, 3),
                "added_s": round(added_time, 4),
                "ratio_by_parts": round((bare_time + added_time) / bare_time, 3),
                "per_image_ms": round(1000 * full_time / batch, 1),
                "peak_rss_gb": round(peak_rss_gb(), 2),
            }
            rows.append(row)
            print(f"batch {batch}  {name:9s} inspect {full_time:8.3f} s  bare vision {bare_time:8.3f} s  "
                  f"ratio {row['ratio']:.3f} (target <= 1.20)  added work {added_time:.3f} s -> ratio by parts "
                  f"{row['ratio_by_parts']:.3f}  peak RSS {row['peak_rss_gb']:.2f} GB")
    print(f"peak RSS overall: {peak_rss_gb():.2f} GB (target <= 3.5 GB at batch 4)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


def run_isolated(args: argparse.Namespace) -> None:
    """One child process per detector; collect and print their figures."""
    rows = []
    for detector in args.detectors:
        command = [sys.executable, __file__, "--in-process", "--detectors", detector,
                   "--backbone", args.backbone, "--image-size", str(args.image_size),
                   "--repeats", str(args.repeats), "--batches", *map(str, args.batches)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        child_json = f"/tmp/bench_model_{detector}.json"
        subprocess.run([*command, "--json", child_json], check=True)
        with open(child_json) as handle:
            rows.extend(json.load(handle))
    print("\nsummary (ratio = full inspection / bare vision forward, target <= 1.20; RSS target <= 3.5 GB at batch 4)")
    for row in rows:
        print(f"  {row['detector']:9s} batch {row['batch']}: ratio {row['ratio']:.3f} "
              f"(by parts {row['ratio_by_parts']:.3f}), "
              f"{row['per_image_ms']:.0f} ms/image, peak RSS {row['peak_rss_gb']:.2f} GB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
