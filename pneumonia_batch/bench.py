"""Throughput benchmark: model-only runtimes, screen.py end to end, and a seed-style loop.

    python -m pneumonia_batch.bench --data ../shared/data --files 300

Everything is measured in one run on one machine, so the ratios compare like
with like.  The corpus is built from the shared data: full-size JPEGs, and
copies of the real DICOMs (uncompressed and JPEG 2000) with fresh UIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .model import DEFAULT_MODEL, read_model_info

ROOT = Path(__file__).resolve().parent.parent


def build_corpus(data: Path, target: Path, n_files: int, seed: int = 0) -> dict:
    """About 80 % full-size JPEGs, 13 % uncompressed DICOM, 7 % JPEG 2000 DICOM, one study per
    folder, the kinds shuffled so that every batch mixes them as an archive night would (sorted
    by kind, the costly JPEG 2000 files would all be decoded before the first batch is out)."""
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    jpegs = sorted((data / "kermany-fullres").rglob("*.jpeg")) + sorted((data / "kermany-val").rglob("*.jpeg"))
    dicoms = {"uncompressed": [data / "dicom" / "RG1_UNCR.dcm", data / "dicom" / "nih-dx-chest-nofinding.dcm"],
              "jpeg2000": [data / "dicom" / "RG1_J2KR.dcm"]}
    datasets = {kind: [pydicom.dcmread(p) for p in paths] for kind, paths in dicoms.items()}
    counts = {"jpeg": round(n_files * 0.8), "uncompressed": round(n_files * 0.13)}
    counts["jpeg2000"] = n_files - counts["jpeg"] - counts["uncompressed"]
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    made = dict.fromkeys(counts, 0)
    for position, kind in enumerate(kinds):
        folder = target / f"study{position:05d}"
        folder.mkdir(parents=True)
        if kind == "jpeg":
            source = jpegs[made[kind] % len(jpegs)]
            shutil.copy(source, folder / source.name)
        else:
            ds = datasets[kind][int(rng.integers(len(datasets[kind])))]
            ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"{kind}.dcm")
        made[kind] += 1
    return counts


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants, from /proc (Linux)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                for child in handle.read().split():
                    pids += process_tree(int(child))
    except OSError:
        pass
    return pids


class PeakRSS:
    """Peak resident memory of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for pid in process_tree(self.pid):
                try:
                    with open(f"/proc/{pid}/statm") as handle:
                        total += int(handle.read().split()[1]) * page
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return self.peak / 2 ** 30


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_process(args: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (the process and every descendant it waited for, such as decode
    workers), peak RSS in GB, and the result."""
    started, cpu_started = time.perf_counter(), _children_cpu_s()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    memory = PeakRSS(process.pid)
    stdout, stderr = process.communicate()
    wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_started
    peak = memory.stop()
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if process.returncode not in (0, 1):
        raise RuntimeError(f"{args[:3]} failed: {stderr[-2000:]}")
    return wall, cpu, peak, result


def model_only(model_path: Path, n_images: int = 320) -> tuple[dict[str, float], dict[str, float]]:
    """Images per second of each runtime on already-decoded inputs, and CPU ms (all threads)
    per image."""
    from .inference import KerasRunner, TFLiteRunner, converted_file

    info = read_model_info(model_path)
    batch = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3)).astype(np.uint8)
    runners = {"keras": lambda: KerasRunner(model_path, info.input_scale, 16),
               "keras-xla": lambda: KerasRunner(model_path, info.input_scale, 16, jit=True)}
    if converted_file(info):
        runners["tflite"] = lambda: TFLiteRunner(converted_file(info), info.input_scale)
    speeds, cpu_ms = {}, {}
    for name, make in runners.items():
        runner = make()
        runner.predict(batch)  # warm-up (and XLA compilation)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(n_images // len(batch)):
            runner.predict(batch)
        speeds[name] = n_images / (time.perf_counter() - started)
        cpu_ms[name] = (time.process_time() - cpu_started) * 1000 / n_images
        del runner
    return speeds, cpu_ms


def decode_costs(corpus: Path) -> dict[str, float]:
    """Mean CPU milliseconds to turn one file into a model input, per kind, in one process."""
    from .preprocess import model_input_from_file

    costs: dict[str, list[float]] = {}
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        kind = "dicom" if path.suffix == ".dcm" else "jpeg"
        label = path.stem if kind == "dicom" else "jpeg"
        started = time.process_time()
        model_input_from_file(str(path), kind)
        costs.setdefault(label, []).append((time.process_time() - started) * 1000)
    result = {label: float(np.mean(values)) for label, values in costs.items()}
    result["all"] = float(np.mean([v for values in costs.values() for v in values]))
    return result


SEED_LOOP = r"""
import sys, time, numpy as np, pydicom, keras
from pathlib import Path
from PIL import Image
from pneumonia_batch.dicom import to_grey
model = keras.models.load_model(sys.argv[2], compile=False)
n = 0
for path in sorted(p for p in Path(sys.argv[1]).rglob('*') if p.is_file()):
    if path.suffix == '.dcm':
        ds = pydicom.dcmread(path)
        grey = Image.fromarray(np.uint8(np.round(to_grey(ds, ds.pixel_array) * 255)))
    else:
        grey = Image.open(path).convert('L')
    x = np.asarray(grey.convert('RGB').resize((224, 224)), np.float32)[None]
    model.predict(x, verbose=0)
    n += 1
print(n)
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pneumonia-bench-") as tmp:
        corpus = Path(tmp) / "corpus"
        counts = build_corpus(args.data, corpus, args.files)
        n = sum(counts.values())
        print(f"corpus: {n} files {counts}; {os.cpu_count()} cores", flush=True)

        speeds, model_cpu_ms = model_only(args.model)
        for name, speed in speeds.items():
            print(f"model only, {name:10s}: {speed:6.1f} img/s, {model_cpu_ms[name]:5.1f} CPU ms/img", flush=True)
        best_name = max(speeds, key=speeds.get)

        decode_ms = decode_costs(corpus)
        print("decode + resize, CPU ms per file: " + ", ".join(f"{k} {v:.1f}" for k, v in decode_ms.items()))

        report = Path(tmp) / "report.json"
        wall, cpu, peak, _ = timed_process([sys.executable, "screen.py", str(corpus), "--out", str(report),
                                            "--no-progress", "--quiet"])
        run = json.loads(report.read_text())["run"]
        scored = run["counts"]["images_scored"]
        steady = run["timings"]["steady_img_s"]
        print(f"screen.py: {scored} images in {wall:.1f} s wall ({scored / wall:.1f} img/s with start-up), "
              f"steady {steady:.1f} img/s on {run['runtime']}, {cpu * 1000 / scored:.1f} CPU ms/img "
              f"(whole process tree, start-up included), peak RSS {peak:.2f} GB", flush=True)
        # Decoding and inference share the cores: however well they overlap, an image costs the
        # CPU time of both.  An estimate, not a hard bound: the model-only CPU time includes the
        # thread pool's spinning, which screen.py's decoding partly puts to use.
        cores = os.cpu_count() or 1
        model_ms = model_cpu_ms.get(run["runtime"], model_cpu_ms[best_name])
        estimate = cores * 1000 / (model_ms + decode_ms["all"])
        print(f"CPU-time estimate for {cores} shared cores: {cores} x 1000 / ({model_ms:.1f} model + "
              f"{decode_ms['all']:.1f} decode CPU ms) = {estimate:.1f} img/s = "
              f"{estimate / speeds[best_name]:.2f} of best model-only", flush=True)

        seed_wall, _, seed_peak, seed = timed_process([sys.executable, "-c", SEED_LOOP, str(corpus),
                                                       str(args.model)])
        print(f"seed-style loop: {seed.stdout.strip()} images in {seed_wall:.1f} s wall, "
              f"peak RSS {seed_peak:.2f} GB", flush=True)

        results = {
            "files": counts, "cores": os.cpu_count(), "model_only_img_s": speeds,
            "model_only_cpu_ms_per_img": model_cpu_ms,
            "decode_cpu_ms_per_file": decode_ms, "cpu_estimate_img_s": estimate,
            "screen_wall_s": wall, "screen_cpu_s": cpu, "screen_steady_img_s": steady,
            "screen_runtime": run["runtime"],
            "screen_peak_rss_gb": peak, "seed_wall_s": seed_wall, "seed_peak_rss_gb": seed_peak,
            "steady_over_best_model_only": steady / speeds[best_name],
            "seed_wall_over_screen_wall": seed_wall / wall,
        }
        print(f"ratios: end-to-end steady / best model-only ({best_name}) = "
              f"{results['steady_over_best_model_only']:.2f}; seed-style wall / screen.py wall = "
              f"{results['seed_wall_over_screen_wall']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
