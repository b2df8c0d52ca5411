"""Command line: option parsing and wiring only; the work lives in the library."""

from __future__ import annotations

import functools
import math
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Callable

import click

from . import __version__
from .atomic import cannot_write_in, same_file, special_kind
from .inference import RUNTIMES, tflite_path
from .model import DEFAULT_MODEL, INPUT_SCALES, ModelError, metadata_path

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE, EXIT_LOCKED, EXIT_FATAL = 0, 1, 2, 3, 4


class FiniteFloatRange(click.FloatRange):
    """Click's FloatRange, refusing nan and the infinities too.  A range lets nan through (every
    comparison with it is false): --threshold nan would flag nothing and still exit 0."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def to_stderr(message: str) -> None:
    click.echo(message, err=True)


def _interruptible(what_is_kept: Callable[[dict], str]):
    """A Ctrl-C (SIGINT) or a stop (SIGTERM: systemd, ``timeout``, ``kill``) anywhere in the
    command ends it cleanly: one line saying what is kept (``what_is_kept`` of the command's
    options), exit 128 + the signal's number.  Not Click's "Aborted!" with exit 1, which a
    monitor would read as unreadable files, nor SIGTERM's silent death."""
    def decorator(command):
        @functools.wraps(command)
        def run(*args, **kwargs):
            received = []

            def stop(signum, frame):
                received.append(signum)
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, stop)
            try:
                return command(*args, **kwargs)
            except KeyboardInterrupt:
                signum = received[0] if received else signal.SIGINT
                click.echo(("terminated" if signum == signal.SIGTERM else "interrupted") + ": "
                           + what_is_kept(kwargs), err=True)
                sys.exit(128 + signum)
            finally:
                signal.signal(signal.SIGTERM, previous)

        return run

    return decorator


def _screening_kept(options: dict) -> str:
    """The state has every batch scored before the stop, and the audit log a run_interrupted line."""
    state = options.get("state_path")
    return "no report written" + (f"; the images scored so far are kept in {state}" if state else "")


def _training_kept(options: dict) -> str:
    """A run folder's progress file names the last complete epoch, and only after its checkpoint is on disk."""
    from .train import finished_epochs, run_folder_path

    done = finished_epochs(options["out"], options["run_dir"])
    if not done:
        return "no epoch had finished, so there is nothing to resume"
    return (f"{run_folder_path(options['out'], options['run_dir'])} keeps the run up to epoch {done}; "
            "the same command with --resume continues from there")


SCREEN_HELP = """Screen every chest X-ray study under DIRECTORY for pneumonia.

\b
DIRECTORY is walked recursively.  DICOM files (recognised by content, with
or without preamble) are grouped into studies by StudyInstanceUID; PNG and
JPEG files by the top-level folder they sit in (a loose file is its own
study).  Each study gets one report row with the highest pneumonia
probability of its images, flagged when it reaches the threshold.

\b
A screening aid trained on paediatric chest X-rays from one centre: it
prioritises studies for a radiologist and is not a diagnosis.

\b
Examples:
  python screen.py ./studies --out report.csv
  python screen.py ./studies --out report.json --threshold 0.5 --no-progress

\b
Exit codes:
  0  every file was read and every eligible study scored
  1  the run completed but some files could not be read (rows with status error),
     or the review export failed (the report is still written)
  2  usage error
  3  another run holds the lock on the state database
  4  fatal: model missing or invalid, output not writable, state database damaged
  130  interrupted (Ctrl-C), 143 stopped (SIGTERM): no report; with --state,
       what was scored is kept
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pneumonia_batch")
def main() -> None:
    """pneumonia_batch: screen chest X-ray studies, and train, evaluate and calibrate its model."""


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Model file to write (.keras or .h5); metadata goes beside it as .json.")
@click.option("--schedule", default="96:4:1e-3,128:1:3e-4,224:1:1e-4", show_default=True,
              help="Progressive resizing: comma-separated size:epochs:learning-rate, ending at 224.")
@click.option("--init", type=click.Choice(["random", "imagenet"]), default="random", show_default=True,
              help="Backbone start: from scratch, or ImageNet weights from --imagenet-weights.")
@click.option("--imagenet-weights", type=click.Path(dir_okay=False, path_type=Path),
              help="Keras DenseNet-121 no-top ImageNet weight file "
                   "(densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5); a resume does not need it.")
@click.option("--frozen-epochs", type=click.IntRange(min=0), show_default="2 with --init imagenet",
              help="With --init imagenet: epochs training the head on a frozen backbone first.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--val-fraction", default=0.1, show_default=True,
              type=FiniteFloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each class's patients held out of the train split for validation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=1),
              help="Early stopping patience (epochs, per phase).")
@click.option("--target-sensitivity", default=0.97, show_default=True,
              type=FiniteFloatRange(0, 1, min_open=True),
              help="Pneumonia sensitivity the threshold is calibrated for on the validation split.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint folder (default runs/<model name>, under the current folder).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.  Without it, "
              "a run folder holding an earlier run's epochs is refused rather than overwritten; with it, a run "
              "folder holding none is refused rather than started afresh.")
@click.option("--limit", type=click.IntRange(min=1), help="Use at most this many images per class (smoke runs).")
@click.option("--from-model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from this trained model's weights (fine-tuning); its training record is "
                   "kept in the new metadata.  On the data it was trained on, keep its --seed and "
                   "--val-fraction.")
@click.option("--average-last", default=0, show_default=True, type=click.IntRange(min=0),
              help="Save the mean of the last N epochs' weights (the final phase then runs at its "
                   "constant learning rate, without early stopping); 0 keeps the 224 px epoch "
                   "with the lowest validation loss.")
@_interruptible(_training_kept)
def train(data_dir, out, schedule, init, imagenet_weights, frozen_epochs, batch_size, val_fraction,
          seed, patience, target_sensitivity, run_dir, resume, limit, from_model, average_last):
    """Train the DenseNet-121 classifier on DATA_DIR/{train/}{NORMAL,PNEUMONIA}.

    \b
    Example:
      python -m pneumonia_batch train ../shared/data/kermany224 --out weights/densenet121_pneumonia.keras
    """
    from .train import OptionError, check_options, parse_schedule, train as run_training

    try:
        phases = parse_schedule(schedule)
        _outside_class_folders("--out", out, data_dir)
        check_options(phases, init=init, imagenet_weights=imagenet_weights, frozen_epochs=frozen_epochs,
                      out=out, from_model=from_model, average_last=average_last, run_dir=run_dir, resume=resume)
    except ValueError as exc:
        raise click.UsageError(str(exc))
    try:
        run_training(data_dir, out, phases, init=init, imagenet_weights=imagenet_weights,
                     frozen_epochs=frozen_epochs, batch_size=batch_size, val_fraction=val_fraction,
                     seed=seed, run_dir=run_dir, resume=resume, patience=patience, limit=limit,
                     target_sensitivity=target_sensitivity, from_model=from_model,
                     average_last=average_last, log=to_stderr)
    except OptionError as exc:  # a split that cannot train, or not the run's or the start model's split
        raise click.UsageError(str(exc))
    except (OSError, ValueError, ModelError) as exc:  # missing checkpoints, no usable images, a bad start model
        raise click.ClickException(str(exc))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
@click.option("--target-sensitivity", type=FiniteFloatRange(0, 1, min_open=True), default=0.97,
              show_default=True)
@click.option("--local", is_flag=True,
              help="DATA_DIR/{NORMAL,PNEUMONIA} holds labelled images of your own (DICOM, PNG or JPEG, "
                   "at any depth): choose the threshold on all of them.")
def calibrate(data_dir, model_path, target_sensitivity, local):
    """Re-choose the model's threshold and store it in the model's metadata.

    \b
    By default DATA_DIR is the training data, and the validation split is
    rebuilt from the patient split recorded in the model's metadata.  With
    --local, the threshold is chosen on your own labelled images instead.
    """
    from .dataset import VALIDATION_SPLIT, list_labelled, rebuild_validation_split
    from .evaluate import calibrate_model
    from .model import checked_metadata

    try:
        if local:
            items, unused = list_labelled(data_dir)
            calibrate_model(model_path, items, f"the labelled folder {data_dir.resolve()}", target_sensitivity,
                            unused, log=to_stderr, folder=data_dir)
        else:
            val_items = rebuild_validation_split(data_dir, checked_metadata(model_path).get("training") or {})
            calibrate_model(model_path, val_items, VALIDATION_SPLIT, target_sensitivity, log=to_stderr)
    except (OSError, ValueError, ModelError) as exc:  # not its data, no usable images, one class only
        raise click.ClickException(str(exc))


@main.command()
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
def convert(model_path):
    """Convert the model to TFLite (beside it, pinned in its metadata) for fast CPU screening."""
    from .inference import convert_to_tflite

    try:
        click.echo(f"written {convert_to_tflite(model_path)}", err=True)
    except (ModelError, OSError) as exc:  # OSError: the disk filled while writing
        raise click.ClickException(str(exc))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
@click.option("--split", default="test", show_default=True,
              help="Split folder to use when DATA_DIR has train/val/test subfolders.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for evaluation.json, roc.png and confusion.png (created; files of an "
                   "earlier evaluation there are replaced).")
def evaluate(data_dir, model_path, split, out_dir):
    """Evaluate the model on a labelled folder DATA_DIR/{NORMAL,PNEUMONIA}.

    The folders may hold DICOM, PNG or JPEG files at any depth; they are read
    and filtered as screening reads them, and files not used are listed.
    """
    from .dataset import list_labelled, resolve_split
    from .evaluate import evaluate as run_evaluation, format_table

    try:
        _outside_class_folders("--out-dir", out_dir, data_dir)
        items, unused = list_labelled(resolve_split(data_dir, split))
        result = run_evaluation(model_path, items, out_dir, unused)
    except (OSError, ValueError, ModelError) as exc:  # no usable or no decodable images, an unwritable --out-dir
        raise click.ClickException(str(exc))
    click.echo(format_table(result))
    click.echo(f"written to {out_dir}/", err=True)


@click.command(help=SCREEN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Report file; .csv or .json.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]),
              help="Report format (default: from the --out extension).")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True,
              help="Keras model (.keras/.h5) with its metadata .json beside it.")
@click.option("--threshold", type=FiniteFloatRange(0, 1),
              help="Flag studies at or above this probability (default: the model's calibrated threshold).")
@click.option("--input-scale", type=click.Choice(INPUT_SCALES),
              help="Pixel scaling for a model without metadata: raw 0..255, unit 0..1, imagenet mean/std.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64),
              help="Decode processes (default: one per core).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
              show_default=True,
              help="Inference runtime: auto takes keras (XLA) on a GPU, else the model's TFLite "
                   "conversion when it has one, else keras.")
@click.option("--header-filter/--no-header-filter", default=True, show_default=True,
              help="Skip DICOM instances whose headers say they are not frontal chest radiographs.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path),
              help="SQLite state for incremental runs: unchanged images already screened with this "
                   "model and threshold are not scored again.  Also locks out concurrent runs (exit 3).")
@click.option("--include-previous", is_flag=True,
              help="With --state: also report studies screened by earlier runs.")
@click.option("--min-age", type=FiniteFloatRange(0), default=0, show_default=True,
              help="Defer studies with a file modified less than this many seconds ago (still arriving).")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Append a JSON-lines audit log: one line per file outcome and per run start/end.")
@click.option("--export-flagged", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for radiologist review: flagged studies' files, Grad-CAM overlays, "
                   "worklist.csv and an offline index.html.  Studies are only ever added.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("-v", "--verbose", is_flag=True, help="More detail on stderr.")
@click.option("-q", "--quiet", is_flag=True,
              help="No summary line: stderr has only errors (files that could not be read, a failed export).")
@click.version_option(__version__, prog_name="pneumonia-screen")
@_interruptible(_screening_kept)
def screen(directory, out, fmt, model_path, threshold, input_scale, batch_size, workers, runtime,
           header_filter, state_path, include_previous, min_age, log_file, export_dir, progress,
           verbose, quiet):
    from .model import read_model_info
    from .pipeline import default_workers
    from .screening import ScreenOptions, failure_message, log_refused_run, screen as run_screen
    from .state import LockHeld

    _standard_streams_open()
    fmt = fmt or {".csv": "csv", ".json": "json"}.get(out.suffix.lower())
    if fmt is None:
        raise click.BadParameter("cannot tell the format from the extension; use .csv, .json or --format",
                                 param_hint="--out")
    if include_previous and not state_path:
        raise click.UsageError("--include-previous needs --state")
    if export_dir is not None and export_dir.resolve() == directory.resolve():
        raise click.UsageError("--export-flagged must not be DIRECTORY itself: the exported copies would "
                               "be screened as new studies")
    _check_outputs_apart({"--out": out, "--state": state_path, "--log-file": log_file, "--export-flagged": export_dir,
                          "--model": model_path, "--model's metadata": metadata_path(model_path),
                          "--model's TFLite conversion": tflite_path(model_path)})
    # The log is not probed here: its one opening, at the run's start, refuses what cannot take it
    # (a probe's open and close would end a FIFO reader such as ``cat``).  The state's lock file goes
    # beside the name given, the database beside the link's target.
    problem = (_cannot_write("--out", out)
               or (_cannot_write("--state", state_path, also_beside_link=True) if state_path else ""))
    if not problem:
        try:
            info = read_model_info(model_path, input_scale=input_scale, threshold=threshold)
        except ModelError as exc:
            problem = str(exc)
    if problem:
        log_refused_run(log_file, directory, problem)  # a night that never started is in the log too
        _fatal(problem)
    say = to_stderr if verbose and not quiet else (lambda m: None)
    say(f"model {info.path.name} sha256 {info.sha256[:12]}, "
        f"threshold {info.threshold:g} ({info.threshold_source})")
    show_bar = bool(sys.stderr and sys.stderr.isatty()) if progress is None else progress
    options = ScreenOptions(directory=directory, out=out, fmt=fmt, model=info, batch_size=batch_size,
                            workers=workers or default_workers(), runtime=runtime,
                            header_filter=header_filter, state=state_path,
                            include_previous=include_previous, min_age=min_age, log_file=log_file,
                            export_dir=export_dir)
    try:
        summary = run_screen(options, progress=_bar if show_bar and not quiet else None, log=say)
    except LockHeld as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_LOCKED)
    except ModelError as exc:
        _fatal(str(exc))
    except sqlite3.Error as exc:  # not a database, a disk full on commit, locked past the timeout
        _fatal(failure_message(exc, state_path))
    except OSError as exc:  # names the file: the report, the state's lock, the log, a full disk
        _fatal(str(exc))
    if not quiet:
        click.echo(summary.line(), err=True)
    else:  # errors, so said even when quiet: a night with them is the one cron should mail
        if errors := summary.counts.get("file_errors"):
            click.echo(f"error: {errors} file{'s' if errors > 1 else ''} could not be read; the report "
                       f"{out} says which and why", err=True)
        if summary.export_error:
            click.echo(f"error: review export failed: {summary.export_error}", err=True)
    sys.exit(summary.exit_code)


def _bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def _check_outputs_apart(paths: dict[str, Path | None]) -> None:
    """Refuse two options naming one file (the report written over the audit log, the state or the
    model's metadata), and a report, state or log file named onto an X-ray, which it would replace
    or append to, or onto a file the review export writes.  Each loses what the user gave us or
    what the run wrote, silently, with exit 0."""
    from .discover import image_kind_of
    from .export import export_would_replace

    named = [(option, path) for option, path in paths.items() if path is not None]
    export_dir = paths.get("--export-flagged")
    for n, (option, path) in enumerate(named):
        for earlier, earlier_path in named[:n]:
            if same_file(path, earlier_path):
                raise click.UsageError(f"{earlier} and {option} name the same file, {path}")
        if option not in ("--out", "--state", "--log-file"):  # the files this run writes or appends to
            continue
        if kind := image_kind_of(path):
            raise click.UsageError(f"{option} {path} is an image ({kind}); refusing to write to it")
        if option != "--log-file" and os.path.exists(path) and (kind := special_kind(os.stat(path))):
            # a report replaces the file it names: --out /dev/null, as root, would delete /dev/null
            raise click.UsageError(f"{option} {path} is a {kind}, not a plain file the run can write")
        if export_dir is not None and export_would_replace(path, export_dir):
            raise click.UsageError(f"{option} {path} is a file the review export writes; name one outside "
                                   "its study folders, not worklist.csv or index.html")


def _outside_class_folders(option: str, path: Path, data_dir: Path) -> None:
    """Refuse an output folder or file inside a labelled class folder of DATA_DIR (``dataset.
    class_folder_holding``): its plots (roc.png, the training curves) would be read as X-rays of
    that class by the next evaluation or training."""
    from .dataset import class_folder_holding

    if (folder := class_folder_holding(path, data_dir)) is not None:
        raise click.UsageError(f"{option} {path} is inside the labelled folder {folder}: its plots would be read "
                               "as X-rays of that class next time")


def _cannot_write(option: str, path: Path, also_beside_link: bool = False) -> str:
    """Why an output cannot be written, found before a night's scoring is spent on it, or ""."""
    real = Path(os.path.realpath(path))  # a symlink is written through to its target
    folders = {real.parent, path.absolute().parent} if also_beside_link else {real.parent}
    for folder in sorted(folders):
        if problem := cannot_write_in(folder):
            return f"{option}: {problem}"
    return ""


def _standard_streams_open() -> None:
    """Give a closed stdin, stdout or stderr (cron's ``2>&-``) /dev/null, before any file is
    opened: else the audit log or the state's lock would take descriptor 2, and every warning a
    library or a decode process prints would land in it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one


def _fatal(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FATAL)


main.add_command(screen)
