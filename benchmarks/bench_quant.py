"""Benchmark: the int8 image encoder against the float one on the CPU, side by side in one process.

``python -m benchmarks.bench_quant --out results/bench`` (``make bench-quant``):

1. Merlin's full-size image encoder (I3D ResNet-152, random weights in Merlin's layout: timing does not
   depend on the values) exported to ONNX and quantised by ``ct-zeroshot-train quantize``'s own
   ``training.quantize.quantize_encoder`` (calibrated on ``--calibration`` synthetic phantoms of Merlin's
   input size, (1,1,224,224,160)).
2. With ``--package`` and ``--int8-package``: a trained package and its quantised copy (the demo model).

For each, ONNX Runtime's CPU provider and OpenVINO's CPU runtime, each on the float and the int8 encoder
(at Merlin's size also the int8 encoder with an int8 stem, ``quantize --stem int8``). Latency: one study
at a time on all cores, ``--runs`` passes per engine interleaved (so drifting machine load hits all
alike), medians. Throughput: as many concurrent streams as cores (ONNX Runtime: one thread per stream;
OpenVINO: its THROUGHPUT hint), ``--per-stream`` studies per stream, studies per hour. The embeddings'
cosine to the float ONNX Runtime ones is stated per engine.
Writes ``quant.json`` and ``quant.md`` in ``--out``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import bench_parser


def cpu_flags() -> list[str]:
    """The vector instruction sets int8 speed depends on (AVX2; AVX-512; VNNI and AMX where present)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"]
    return [f for f in wanted if f in words]


def _engines(models: dict[str, Path], streams: int, throughput: bool):
    """name -> a callable running one (1,1,X,Y,Z) input (latency), or a callable running a list of inputs
    over ``streams`` concurrent streams (throughput)."""
    import onnxruntime as ort

    from operators.contract.scoring import OpenVinoSession, open_session

    engines = {}
    for precision, path in models.items():
        if not throughput:
            sess = open_session(path, ["CPUExecutionProvider"])
            engines[f"onnxruntime {precision}"] = lambda x, s=sess: s.run(["embedding"], {"image": x})[0]
            ov = OpenVinoSession(path)
            engines[f"openvino {precision}"] = lambda x, s=ov: s.run(["embedding"], {"image": x})[0]
            continue
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def ort_many(xs, s=sess):
            with ThreadPoolExecutor(streams) as ex:
                list(ex.map(lambda x: s.run(["embedding"], {"image": x}), xs))

        engines[f"onnxruntime {precision}"] = ort_many
        ov = OpenVinoSession(path, hint="THROUGHPUT")

        def ov_many(xs, s=ov):
            import openvino as ov_

            queue = ov_.AsyncInferQueue(s.compiled, streams)
            for x in xs:
                queue.start_async({"image": x})
            queue.wait_all()

        engines[f"openvino {precision}"] = ov_many
    return engines


def measure(models: dict[str, Path], inputs: list[np.ndarray], runs: int, per_stream: int) -> dict:
    """Latency and throughput of ``models`` ("float" and int8 variants) on both runtimes on ``inputs`` (the
    first is timed; all are compared)."""
    streams = os.cpu_count() or 1
    lat = _engines(models, streams, throughput=False)
    ref = [lat["onnxruntime float"](x) for x in inputs]
    agreement = {}
    for name, fn in lat.items():
        outs = [fn(x) for x in inputs]  # also the warm-up
        cos = [float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref, outs)]
        agreement[name] = min(cos)
    times: dict[str, list[float]] = {name: [] for name in lat}
    for _ in tqdm(range(runs), desc="latency rounds", unit="round"):
        for name, fn in lat.items():
            t = time.perf_counter()
            fn(inputs[0])
            times[name].append(time.perf_counter() - t)
    del lat
    tput = _engines(models, streams, throughput=True)
    per_hour = {}
    batch = [inputs[i % len(inputs)] for i in range(streams * per_stream)]
    for name, fn in tqdm(tput.items(), desc="throughput", unit="engine"):
        fn(batch[:streams])  # warm-up: every stream once
        t = time.perf_counter()
        fn(batch)
        per_hour[name] = len(batch) / (time.perf_counter() - t) * 3600
    median = {n: statistics.median(v) for n, v in times.items()}
    base_lat, base_tp = median["onnxruntime float"], per_hour["onnxruntime float"]
    # what a server gets from each engine: the better of one study at a time (3600 / latency) and streams
    best = {n: max(per_hour[n], 3600 / median[n]) for n in median}
    return {
        "best_studies_per_hour": best,
        "best_ratio_vs_onnxruntime_float": {n: v / best["onnxruntime float"] for n, v in best.items()},
        "latency_median_s": median,
        "latency_all_s": times,
        "throughput_studies_per_hour": per_hour,
        "streams": streams,
        "studies_per_throughput_run": len(batch),
        "latency_speedup_vs_onnxruntime_float": {n: base_lat / m for n, m in median.items()},
        "throughput_ratio_vs_onnxruntime_float": {n: v / base_tp for n, v in per_hour.items()},
        "int8_over_float_same_runtime": {
            f"{rt} {v}": {
                "latency": median[f"{rt} float"] / median[f"{rt} {v}"],
                "throughput": per_hour[f"{rt} {v}"] / per_hour[f"{rt} float"],
            }
            for rt in ("onnxruntime", "openvino")
            for v in models
            if v != "float"
        },
        "embedding_cosine_to_onnxruntime_float_min": agreement,
        "bytes": {v: path.stat().st_size for v, path in models.items()},
    }


def merlin_size(tmp: Path, calibration: int, runs: int, per_stream: int, arch: str = "i3_resnet152") -> dict:
    import torch

    from benchmarks.bench_onnx import image_tower
    from operators.contract.preprocessing import PreprocessSpec
    from training.onnx_export import export_image_onnx
    from training.quantize import calibration_reader, quantize_encoder
    from training.synth.inputs import synthetic_inputs

    spec = PreprocessSpec.merlin() if arch == "i3_resnet152" else PreprocessSpec.tiny()
    print(f"making {calibration + 2} synthetic inputs of {spec.spatial_size} ...", flush=True)
    x = synthetic_inputs(spec, n=calibration + 2)
    held = [x[i : i + 1] for i in range(calibration, calibration + 2)]
    f32, q8, q8s = tmp / "merlin_float.onnx", tmp / "merlin_int8.onnx", tmp / "merlin_int8_stem.onnx"
    print(f"exporting the {arch} image encoder (random weights) ...", flush=True)
    export_image_onnx(image_tower(arch), f32, torch.from_numpy(x[:1]))
    t = time.perf_counter()
    reader = calibration_reader(list(range(calibration)), lambda i: x[i : i + 1], "image", True)
    quantize_encoder(f32, q8, reader)
    quantize_s = time.perf_counter() - t
    reader = calibration_reader(list(range(calibration)), lambda i: x[i : i + 1], "image", True)
    quantize_encoder(f32, q8s, reader, stem="int8")
    out = measure({"float": f32, "int8": q8, "int8 (int8 stem)": q8s}, held, runs, per_stream)
    out["what"] = (
        "Merlin I3D ResNet-152 image encoder, random weights in Merlin's layout, inputs (1,1,224,224,160)"
        if arch == "i3_resnet152"
        else f"{arch} image encoder, random weights, inputs {held[0].shape}"
    )
    out["calibration"] = f"{calibration} synthetic phantoms; the timed and compared inputs are 2 others"
    out["quantize_s"] = round(quantize_s, 1)
    return out


def package_pair(float_pkg: Path, int8_pkg: Path, runs: int, per_stream: int) -> dict:
    from operators.contract.package import load_package
    from training.synth.inputs import synthetic_inputs

    f, q = load_package(float_pkg), load_package(int8_pkg)
    x = synthetic_inputs(f.spec, n=2)
    models = {"float": f.image_encoder_path, "int8": q.image_encoder_path}
    out = measure(models, [x[i : i + 1] for i in range(2)], runs, per_stream)
    out["what"] = (
        f"{f.name} {f.version} and {q.name} {q.version}, inputs (1,1,{','.join(map(str, f.spec.spatial_size))})"
    )
    out["packages"] = {"float": str(float_pkg), "int8": str(int8_pkg)}
    out["package_agreement"] = {
        k: v for k, v in q.manifest.provenance.get("quantization", {}).items() if k in ("check", "evaluation")
    }
    return out


def _table(r: dict) -> list[str]:
    lines = [
        f"**{r['what']}**",
        "",
        f"| engine | latency median s | vs ORT float | studies/h ({r['streams']} streams) | vs ORT float "
        "| studies/h, the better of one at a time and streams | vs ORT float | cosine to ORT float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["latency_median_s"].items():
        lines.append(
            f"| {name} | {m:.3f} | {r['latency_speedup_vs_onnxruntime_float'][name]:.2f}x | "
            f"{r['throughput_studies_per_hour'][name]:,.0f} | "
            f"{r['throughput_ratio_vs_onnxruntime_float'][name]:.2f}x | "
            f"{r['best_studies_per_hour'][name]:,.0f} | {r['best_ratio_vs_onnxruntime_float'][name]:.2f}x | "
            f"{r['embedding_cosine_to_onnxruntime_float_min'][name]:.5f} |"
        )
    same = r["int8_over_float_same_runtime"]
    lines += [
        "",
        "int8 over float on the same runtime: "
        + "; ".join(f"{k}: {v['latency']:.2f}x latency, {v['throughput']:.2f}x throughput" for k, v in same.items())
        + ". Encoder files: "
        + ", ".join(f"{v} {b / 1e6:.0f} MB" for v, b in r["bytes"].items())
        + ".",
        "",
    ]
    return lines


def run_benchmark(
    out: Path,
    runs: int,
    per_stream: int,
    calibration: int,
    package: Path | None,
    int8_package: Path | None,
    command: str,
    arch: str = "i3_resnet152",
) -> dict:
    import onnxruntime
    import openvino

    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": command,
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "processor": platform.processor() or platform.machine(),
        "machine": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["merlin_size"] = merlin_size(Path(tmp), calibration, runs, per_stream, arch)
    if package is not None and int8_package is not None:
        result["package"] = package_pair(package, int8_package, runs * 4, per_stream * 8)
    (out / "quant.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# int8 image encoder vs float on the CPU",
        "",
        f"`{command}` on {result['cpu_count']} CPU cores ({result['processor']}; {', '.join(result['cpu_flags'])}), "
        f"onnxruntime {result['onnxruntime']}, openvino {result['openvino']}.",
        "",
        *_table(result["merlin_size"]),
    ]
    if "package" in result:
        lines += _table(result["package"])
        for name, rec in result["package"]["package_agreement"].items():
            lines.append(
                f"- {name}: {rec['studies']} {rec['split']} studies of {Path(rec['corpus']).name}, "
                f"{rec['changed_fraction']:.2%} of decisions changed; macro AUROC (labels) "
                f"{rec['report_labels']['macro_auroc_float']:.4f} float, "
                f"{rec['report_labels']['macro_auroc_int8']:.4f} int8"
                + (
                    f"; (truth) {rec['ground_truth']['macro_auroc_float']:.4f} float, "
                    f"{rec['ground_truth']['macro_auroc_int8']:.4f} int8"
                    if "ground_truth" in rec
                    else ""
                )
            )
    (out / "quant.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv=None) -> int:
    p = bench_parser("bench_quant", __doc__)
    p.add_argument("--runs", type=int, default=5, help="latency passes per engine (default 5)")
    p.add_argument("--per-stream", type=int, default=2, help="studies per stream in the throughput runs (default 2)")
    p.add_argument("--calibration", type=int, default=8, help="calibration inputs, Merlin size (default 8)")
    p.add_argument(
        "--arch", default="i3_resnet152", help="image architecture (default: Merlin's; small ones for tests)"
    )
    p.add_argument("--package", help="a float package (the demo model, say) ...")
    p.add_argument("--int8-package", help="... and its ct-zeroshot-train quantize copy")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_quant " + " ".join(argv if argv is not None else os.sys.argv[1:])
    run_benchmark(
        Path(args.out),
        args.runs,
        args.per_stream,
        args.calibration,
        Path(args.package) if args.package else None,
        Path(args.int8_package) if args.int8_package else None,
        command.strip(),
        args.arch,
    )
    print((Path(args.out) / "quant.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
