"""Throughput benchmark: model-only runtimes, screen.py end to end, and a seed-style loop.

    python -m pneumonia_batch.bench --data ../shared/data --files 300
    python -m pneumonia_batch.bench --decode-shift [--json shift.json]   # reduced decoding's effect

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
from .screening import ScreenOptions

ROOT = Path(__file__).resolve().parent.parent
SCREEN_BATCH = ScreenOptions.batch_size
# screen.py's steady throughput runs from its first batch out to its last: it needs three batches.
MIN_FILES = 2 * SCREEN_BATCH + 1


class BenchFailed(RuntimeError):
    """A measured program failed, or did not score every file of the corpus."""


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


def timed_process(args: list[str], name: str) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall seconds, CPU seconds (the process and every descendant it waited for, such as decode
    workers), peak RSS in GB, and the result of a run that must succeed."""
    started, cpu_started = time.perf_counter(), _children_cpu_s()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    memory = PeakRSS(process.pid)
    stdout, stderr = process.communicate()
    wall, cpu = time.perf_counter() - started, _children_cpu_s() - cpu_started
    peak = memory.stop()
    result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    if process.returncode != 0:
        raise BenchFailed(f"{name} exited with code {process.returncode}:\n{stderr[-2000:]}")
    return wall, cpu, peak, result


def model_only(model_path: Path, n_images: int = 320) -> tuple[dict[str, float], dict[str, float]]:
    """Images per second of each runtime on already-decoded inputs, and CPU ms (all threads)
    per image."""
    from .inference import KerasRunner, TFLiteRunner, converted_model

    info = read_model_info(model_path)
    batch = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3)).astype(np.uint8)
    runners = {"keras": lambda: KerasRunner(model_path, info.input_scale, 16),
               "keras-xla": lambda: KerasRunner(model_path, info.input_scale, 16, jit=True)}
    if converted := converted_model(info):
        runners["tflite"] = lambda: TFLiteRunner(converted, info.input_scale)
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


def _j2k_twin(grey, path: Path) -> None:
    """A 12-bit JPEG 2000 lossless CR twin of an 8-bit grey image (0..255 -> 0..4095), with a window
    over the whole range as CR systems send one: an image without a window is decoded in full."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    from .dicom import CR_IMAGE

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "AP"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = grey.height, grey.width
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.round(np.asarray(grey, np.float64) * (4095 / 255)).astype(np.uint16).tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=True)


def decode_shift(data: Path, model_path: Path) -> dict:
    """How far reduced-resolution decoding moves the model's probabilities, per file kind.

    Screening decodes large JPEGs at a reduced DCT scale (Pillow draft) and large JPEG 2000
    DICOMs at half resolution, never below DECODE_MIN_SIDE a side, to save time.  This scores
    every full-size JPEG of kermany-fullres and kermany-val (never the test split), and a 12-bit
    JPEG 2000 lossless DICOM twin of each, decoded in full and reduced, with the TFLite runtime
    screening uses.  README quotes these numbers: rerun it when the model or the decoding changes.
    """
    from .images import read_grey
    from .inference import make_runner
    from .preprocess import DECODE_MIN_SIDE, read_grey_image, to_model_input

    runner = make_runner(read_model_info(model_path), "tflite", 16)
    sources = sorted((data / "kermany-fullres").rglob("*.jpeg")) + sorted((data / "kermany-val").rglob("*.jpeg"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="pneumonia-shift-") as tmp:
        twins = [Path(tmp) / f"{i:03d}.dcm" for i in range(len(sources))]
        for source, twin in zip(sources, twins):
            _j2k_twin(read_grey(source), twin)
        for kind, decoder, paths in (("jpeg", "jpeg", sources), ("jpeg2000", "dicom", twins)):
            full, reduced, was_reduced = [], [], []
            for path in paths:  # model_input_from_file in two steps, to see the decoded size
                whole, small = (read_grey_image(str(path), decoder, side)[0] for side in (None, DECODE_MIN_SIDE))
                was_reduced.append(small.size != whole.size)
                full.append(to_model_input(whole))
                reduced.append(to_model_input(small))
            shift = np.abs(runner.predict(np.stack(reduced)) - runner.predict(np.stack(full)))
            worst, n_reduced = int(np.argmax(shift)), sum(was_reduced)
            mean = float(shift[was_reduced].mean()) if n_reduced else 0.0
            results[kind] = {"files": len(paths), "decoded_reduced": n_reduced, "max_shift": float(shift[worst]),
                             "max_shift_file": str(sources[worst].relative_to(data)),
                             "mean_shift_of_reduced": mean}
            print(f"{kind:8s}: {len(paths)} files, {n_reduced} decoded reduced; |probability shift| max "
                  f"{shift[worst]:.4f} ({results[kind]['max_shift_file']}), mean of reduced {mean:.5f}", flush=True)
    return {"model": model_path.name, "runtime": "tflite", "decode_min_side": DECODE_MIN_SIDE, "kinds": results}


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


def seed_loop(corpus: Path, model_path: Path, n_files: int) -> tuple[float, float]:
    """Wall seconds and peak RSS in GB of the seed-style loop, which must score every file."""
    wall, _, peak, result = timed_process([sys.executable, "-c", SEED_LOOP, str(corpus),
                                           str(Path(model_path).resolve())], "the seed-style loop")
    printed = result.stdout.split()[-1:]
    if printed != [str(n_files)]:
        raise BenchFailed(f"the seed-style loop scored {printed[0] if printed else 'no'} images "
                          f"of {n_files} files")
    return wall, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--decode-shift", action="store_true",
                        help="only measure how reduced-resolution decoding moves the probabilities")
    args = parser.parse_args(argv)
    if not args.decode_shift and args.files < MIN_FILES:
        parser.error(f"--files must be at least {MIN_FILES}: screen.py's steady throughput is measured "
                     f"from its first batch of {SCREEN_BATCH} images to its last, so it needs three batches")

    if args.decode_shift:
        results = decode_shift(args.data, args.model)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return

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
        # Exit code 1 (some files could not be read) is a failure too: the corpus holds readable
        # files only, and a run that scored fewer of them would be measured too fast.
        wall, cpu, peak, _ = timed_process([sys.executable, "screen.py", str(corpus), "--out", str(report),
                                            "--model", str(args.model.resolve()),
                                            "--batch-size", str(SCREEN_BATCH), "--no-progress", "--quiet"],
                                           "screen.py")
        run = json.loads(report.read_text())["run"]
        scored = run["counts"]["images_scored"]
        if scored != n:
            raise BenchFailed(f"screen.py scored {scored} images of {n} files")
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

        seed_wall, seed_peak = seed_loop(corpus, args.model, n)
        print(f"seed-style loop: {n} images in {seed_wall:.1f} s wall, "
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
    try:
        main()
    except BenchFailed as exc:
        sys.exit(f"benchmark failed: {exc}")
