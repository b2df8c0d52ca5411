"""Training: a resumable, progressive-resizing run of the DenseNet-121 classifier.

DenseNet-121 is fully convolutional with global pooling, so one set of weights
trains at several resolutions.  A schedule such as ``96:4:1e-3,128:1:3e-4,224:1:1e-4``
(size:epochs:learning-rate) spends most epochs at low resolution, where a CPU
is fast, and always ends at the screening resolution (224), where the
checkpoint is chosen.  Every epoch writes its weights and the optimiser's
state, then the progress file, whose history names the last complete epoch and
the best 224 px one; only then do the files it no longer names go.  So a crash or a kill
at any point leaves a consistent run, and ``--resume`` continues where it
stopped: same weights, Adam moments and learning rate, the plateau and
early-stopping counters replayed from the history, and a phase that had stopped
early stays stopped.  Only the random draws differ.  The progress file also pins the validation
split (seed, fraction, limit and a digest of the validation images' names) and the recipe (init,
batch size, and a schedule that a resume may only lengthen at its end): a resume with another
is refused.

With ``average_last=N`` the final 224 px phase runs at a constant learning rate,
keeps every epoch's weights, and the model saved is the mean of its last N
epochs with BatchNorm statistics recomputed for those mean weights (stochastic
weight averaging, Izmailov et al. 2018).  ``from_model`` starts the run from an
existing model's weights, so a shipped model can be fine-tuned further.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .atomic import cannot_write_in, fsync_path, save_atomic, write_atomic, write_json_atomic
from .dataset import (VALIDATION_SPLIT, LabelledImage, list_training, patient_of, recorded_split,
                      resolve_split, split_by_patient, training_patients)
from .discover import count_reasons, readable
from .model import (CLASS_NAMES, INPUT_SIZE, PNEUMONIA_INDEX, backbone_of, build_model, import_quietly,
                    metadata_path, read_only, sha256_of)
from .preprocess import model_input_from_file

# Keras's defaults for the two validation-loss callbacks, which a resume replays
EARLY_STOP_MIN_DELTA = 0.0
PLATEAU_MIN_DELTA = 1e-4
PLATEAU_PATIENCE = 1

# The seed recipe's fine-tuning cut: with ImageNet weights the first 100
# backbone layers stay frozen after the head has been trained.
UNFREEZE_FROM_LAYER = 100
FROZEN_EPOCHS = 2  # head-only epochs on the frozen ImageNet backbone first, unless told otherwise

# The options that make a validation split: a run and its resumes must agree on them, and on the
# validation images themselves, or the epochs of one split would be chosen on another.
SPLIT_OPTIONS = {"seed": "--seed", "val_fraction": "--val-fraction", "limit": "--limit"}


class OptionError(ValueError):
    """Options that do not fit the data, the run folder or the start model: a usage error."""


@dataclass(frozen=True)
class PhaseProgress:
    """Where a phase stood after its last recorded epoch: what its callbacks knew."""
    stopped_early: bool = False
    learning_rate: float | None = None  # after any plateau cut
    early_stop_best: float | None = None
    early_stop_wait: int = 0
    plateau_best: float | None = None


def phase_progress(rows: list[dict], patience: int) -> PhaseProgress:
    """Replay a phase's recorded history rows through Keras's EarlyStopping and
    ReduceLROnPlateau rules (mode min, their default min_delta), so a resumed phase
    goes on with the counters an uninterrupted run would have."""
    if not rows:
        return PhaseProgress()
    import numpy as np

    def improves(loss, min_delta, best):  # as Keras compares: in float32
        return best is None or np.float32(loss + min_delta) < np.float32(best)

    early_best, wait, plateau_best = None, 0, None
    for loss in (row["val_loss"] for row in rows):
        wait += 1
        if improves(loss, EARLY_STOP_MIN_DELTA, early_best):
            early_best, wait = loss, 0
        if improves(loss, PLATEAU_MIN_DELTA, plateau_best):
            plateau_best = loss
    # the plateau counter needs no replay: at patience 1 every epoch without improvement cuts
    return PhaseProgress(stopped_early=wait > 0 and wait >= patience, learning_rate=rows[-1]["learning_rate"],
                         early_stop_best=early_best, early_stop_wait=wait, plateau_best=plateau_best)


@dataclass(frozen=True)
class Phase:
    size: int
    epochs: int
    learning_rate: float
    frozen_backbone: bool = False


UNUSED_NAMED = 20  # files not used that the log names; a folder of DICOMs has thousands


def parse_schedule(text: str) -> list[Phase]:
    """``"96:4:1e-3,224:1:1e-4"`` -> phases (``check_options`` holds them to ending at 224)."""
    phases = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3):
            raise ValueError(f"schedule entry {part!r} is not size:epochs[:lr]")
        try:
            size, epochs = int(fields[0]), int(fields[1])
            lr = float(fields[2]) if len(fields) == 3 else 1e-3
        except ValueError:
            raise ValueError(f"schedule entry {part!r} is not size:epochs[:lr] with whole numbers "
                             "for size and epochs") from None
        if size < 32 or epochs < 1 or not 0 < lr < math.inf:
            raise ValueError(f"schedule entry {part!r} out of range")
        phases.append(Phase(size, epochs, lr))
    return phases


def run_folder_path(out: Path, run_dir: Path | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / Path(out).stem


def finished_epochs(out: Path, run_dir: Path | None) -> int:
    """The epochs the run folder's progress file records as complete; 0 when there is none to read."""
    try:
        return int(_RunFolder(run_folder_path(out, run_dir)).load_progress()["completed_epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def check_options(schedule: list[Phase], *, init: str, imagenet_weights: Path | None, out: Path,
                  from_model: Path | None, average_last: int, run_dir: Path | None, resume: bool,
                  frozen_epochs: int | None = None) -> None:
    """Refuse option combinations that cannot train, before any data is read."""
    if schedule[-1].size != INPUT_SIZE:
        raise ValueError(f"the schedule must end at the screening resolution {INPUT_SIZE}")
    if average_last > schedule[-1].epochs:
        raise ValueError(f"--average-last {average_last} exceeds the {schedule[-1].epochs} epochs "
                         "of the schedule's final phase")
    if from_model is not None and init != "random":
        raise ValueError("--from-model takes its weights from that model; leave --init at random")
    progress = run_folder_path(out, run_dir) / "progress.json"
    if not resume and progress.is_file():  # a forgotten --resume must not wipe hours of training
        raise ValueError(f"{progress.parent} holds an earlier run: --resume continues it; to start afresh, "
                         "remove that folder or give another --run-dir")
    if resume and not progress.is_file():  # run from another folder, the default runs/ is another one
        raise ValueError(f"--resume: {progress} does not exist, so there is no run to continue there; "
                         "give the run's --run-dir (the default is relative to the current folder), or "
                         "leave out --resume to start a new run")
    # a resume takes its weights from the run's checkpoint
    if init == "imagenet" and not resume and (imagenet_weights is None or not Path(imagenet_weights).is_file()):
        raise ValueError("--init imagenet needs --imagenet-weights naming the Keras DenseNet-121 no-top weight "
                         "file: the weights cannot be downloaded here")
    if init != "imagenet" and (imagenet_weights is not None or frozen_epochs is not None):
        # else a user who forgot --init imagenet would train from scratch for hours, unawares
        raise ValueError("--imagenet-weights and --frozen-epochs go with --init imagenet; this run would "
                         "start from " + ("--from-model" if from_model is not None else "random weights"))
    if Path(out).suffix not in (".keras", ".h5"):  # Keras saves lower-case suffixes only
        raise ValueError(f"--out {out}: the model file name must end in .keras (or .h5)")
    if read_only(out) or read_only(metadata_path(out)):
        raise ValueError(f"--out {out}: that model or its metadata is read-only")
    for option, path in (("--out", out), ("--out", metadata_path(out)), ("--run-dir", progress)):
        _check_writable(option, path)
    start = Path(from_model).resolve().with_suffix("") if from_model is not None else None
    if start == Path(out).resolve().with_suffix(""):  # the start model and its history must survive the run
        raise ValueError("--out would overwrite the --from-model model and its history; write the "
                         "fine-tuned model elsewhere")


def _check_writable(option: str, path: Path) -> None:
    """Refuse a file that cannot be written, before hours of training rather than after them."""
    folder = Path(os.path.realpath(path)).parent  # a symlink is written through to its target
    while not folder.exists():  # the run makes the missing folders
        folder = folder.parent
    if problem := cannot_write_in(folder):
        raise ValueError(f"{option} {path}: {problem}")


def image_dataset(items: list[LabelledImage], size: int, batch_size: int,
                  augment: bool, seed: int):
    """tf.data: decode to 224x224 RGB as screening does, optionally augment, resize to ``size``, batch.

    Each file goes through ``model_input_from_file``, screening's own decode, once (then cached):
    TensorFlow's decoders differ from Pillow's (JPEG by up to 2 grey levels, full-size images
    by 4-10 after the resize, 16-bit PNGs almost black), so the model would learn pixels that
    screening never gives it.
    """
    import tensorflow as tf

    def decode(path, kind):
        try:
            return model_input_from_file(os.fsdecode(path), kind.decode())[0]
        except Exception as exc:  # changed since it was listed: TensorFlow's message would not name it
            message = f"{os.fsdecode(path)}: {type(exc).__name__}: {exc}"
            raise OSError(message.encode("utf-8", "backslashreplace").decode()) from exc  # TensorFlow wants UTF-8

    def load(path, kind, label):
        image = tf.numpy_function(decode, [path, kind], tf.uint8, stateful=False)
        image.set_shape((INPUT_SIZE, INPUT_SIZE, 3))
        return image, label

    def finish(image, label, draw_seed=None):  # draw_seed: with augment
        image = tf.cast(image, tf.float32)
        if augment:
            image = random_affine_and_tone(image, draw_seed)
        if size != INPUT_SIZE:
            image = tf.image.resize(image, (size, size), antialias=True)
        return image, label

    paths = tf.constant([os.fsencode(i.path) for i in items])  # bytes: any file name
    kinds = tf.constant([i.kind for i in items])
    labels = tf.constant([i.label for i in items], dtype=tf.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, kinds, labels))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if augment:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True)
        # Keras iterates the dataset afresh each epoch, and random ops inside a map start again
        # from the global seed each time: the draws come from a stream that changes per epoch
        draw_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, draw_seeds)).map(lambda pair, draw_seed: finish(*pair, draw_seed),
                                                       num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(2)


AUGMENTATION = ("rotation +-10 deg, shift +-8 %, zoom 0.85-1.15, gamma 0.7-1.4 (log-uniform), "
                "contrast 0.7-1.3, brightness +-25/255; no flips")


def random_affine_and_tone(image, seed):
    """Small rotation, shift and zoom; gamma, contrast and brightness; never a flip.  The draws
    are a function of ``seed`` (two integers), so a training run can be repeated.

    The tone ranges are wide on purpose: a network trained from scratch on one
    centre's images keys on their exact grey levels (half a grey level of bias
    moved probabilities by up to 0.01), and other exposures of healthy children were
    called pneumonia.  Augmenting here rather than with Keras layers inside the
    model keeps the network graph free of random ops (and so compilable with XLA).
    """
    import tensorflow as tf

    seeds = iter(tf.unstack(tf.random.split(tf.cast(seed, tf.int64), 6)))

    def uniform(shape, low, high):
        return tf.random.stateless_uniform(shape, next(seeds), low, high)

    angle = uniform((), -10.0, 10.0) * math.pi / 180
    zoom = uniform((), 0.85, 1.15)
    shift = uniform((2,), -0.08, 0.08) * INPUT_SIZE
    c = (INPUT_SIZE - 1) / 2.0
    a0, a1 = tf.cos(angle) / zoom, -tf.sin(angle) / zoom
    b0, b1 = tf.sin(angle) / zoom, tf.cos(angle) / zoom
    a2 = c - a0 * c - a1 * c + shift[0]
    b2 = c - b0 * c - b1 * c + shift[1]
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None, :]
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.constant([INPUT_SIZE, INPUT_SIZE]),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    gamma = tf.exp(uniform((), math.log(0.7), math.log(1.4)))
    image = 255.0 * tf.pow(image / 255.0, gamma)
    contrast = uniform((), 0.7, 1.3)
    brightness = uniform((), -25.0, 25.0)
    mean = tf.reduce_mean(image)
    return tf.clip_by_value((image - mean) * contrast + mean + brightness, 0.0, 255.0)


def class_weights(items: list[LabelledImage]) -> dict[int, float]:
    """Weights that make both classes count equally in the loss."""
    counts = [sum(1 for i in items if i.label == k) for k in range(len(CLASS_NAMES))]
    total = sum(counts)
    return {k: total / (len(counts) * n) for k, n in enumerate(counts) if n}


def _pneumonia_auc(keras):
    class PneumoniaAUC(keras.metrics.AUC):
        """ROC-AUC of the pneumonia column against integer labels."""

        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(y_true, y_pred[:, PNEUMONIA_INDEX], sample_weight)

    return PneumoniaAUC(name="auc")


def _set_trainable(model, phase: Phase, init: str) -> None:
    backbone = backbone_of(model)
    if phase.frozen_backbone:
        backbone.trainable = False
        return
    backbone.trainable = True
    if init == "imagenet":
        for layer in backbone.layers[:UNFREEZE_FROM_LAYER]:
            layer.trainable = False


class _RunFolder:
    """Checkpoints and progress of one training run (kept out of git)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.progress = self.root / "progress.json"

    def epoch_weights(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch:03d}.weights.h5"

    def epoch_optimizer(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch:03d}.optimizer.npz"

    def sweep(self, keep_weights: set[int], keep_optimizer: int) -> None:
        """Remove the epoch files that the progress file no longer needs."""
        for path in self.root.glob("epoch-*"):
            epoch = int(path.name.split(".")[0].removeprefix("epoch-"))
            if epoch not in (keep_weights if path.name.endswith(".weights.h5") else {keep_optimizer}):
                path.unlink()

    def load_progress(self) -> dict:
        if self.progress.is_file():
            return json.loads(self.progress.read_text())
        return {"completed_epochs": 0, "history": []}

    def save_progress(self, progress: dict) -> None:
        write_json_atomic(self.progress, progress)


def train(data_dir: Path, out: Path, schedule: list[Phase], *, init: str = "random",
          imagenet_weights: Path | None = None, frozen_epochs: int | None = None, batch_size: int = 16,
          val_fraction: float = 0.1, seed: int = 0, run_dir: Path | None = None,
          resume: bool = False, patience: int = 3, limit: int | None = None,
          target_sensitivity: float = 0.97, from_model: Path | None = None,
          average_last: int = 0, log=print):
    """Train, keep the best 224-px checkpoint (or the mean of the last ``average_last``
    epochs), save it with metadata and calibrate it.

    Returns the saved model (in memory) and its metadata.
    """
    keras = import_quietly("keras")
    import tensorflow as tf

    from .evaluate import calibrate_model

    check_options(schedule, init=init, imagenet_weights=imagenet_weights, frozen_epochs=frozen_epochs,
                  out=out, from_model=from_model, average_last=average_last, run_dir=run_dir, resume=resume)
    frozen_epochs = FROZEN_EPOCHS if frozen_epochs is None else frozen_epochs
    if init == "imagenet" and frozen_epochs > 0:
        schedule = [Phase(schedule[0].size, frozen_epochs, schedule[0].learning_rate, True)] + schedule
    out = Path(out)
    run = _RunFolder(run_folder_path(out, run_dir))
    progress = run.load_progress() if resume else {"completed_epochs": 0, "history": []}
    resuming = resume and progress["completed_epochs"]  # else a run folder whose first epoch never finished
    last_weights = run.epoch_weights(progress["completed_epochs"])
    if resuming and not last_weights.is_file():
        raise FileNotFoundError(f"cannot resume: {last_weights}, the weights of the last epoch that "
                                f"{run.progress} records, is missing")

    # a run folder from before these were recorded takes this run's
    progress.setdefault("average_last", average_last)
    recipe = {"init": init, "batch_size": batch_size, "schedule": [asdict(p) for p in schedule]}
    _check_resume_options(progress, recipe, average_last, from_model, run.progress)  # before the data are decoded
    progress["recipe"] = recipe  # a longer schedule given to a resume is the run's from now on
    train_dir = resolve_split(data_dir, "train")
    items, unused = list_training(train_dir)
    if unused:
        log(f"{len(unused)} files under {train_dir} not used: {count_reasons(u.reason for u in unused)}")
        for item in unused[:UNUSED_NAMED]:
            log(f"  {readable(str(Path(item.path).relative_to(train_dir)))}: {item.reason}")
        if len(unused) > UNUSED_NAMED:
            log(f"  and {len(unused) - UNUSED_NAMED} more")
    train_items, val_items = split_by_patient(items, val_fraction, seed)
    _require_both_classes(items, train_items, val_fraction)
    if limit:  # tiny runs for tests and smoke checks
        train_items, val_items = _take_each_class(train_items, limit), _take_each_class(val_items, limit)
    # the folder is only recorded: data copied or moved elsewhere splits the same way
    split = {"data": str(train_dir.resolve()), "seed": seed, "val_fraction": val_fraction, "limit": limit,
             "validation_sha256": _names_digest(val_items, train_dir)}
    # a run folder from before splits were recorded takes this run's
    _check_resume_split(progress.setdefault("split", split), split, run.progress)
    if from_model is not None and "started_from" not in progress:
        progress["started_from"] = _started_from(from_model)
    if "started_from" in progress:
        _check_start_split(progress["started_from"], items, val_items, log)
    weights = class_weights(train_items)
    log(f"training on {len(train_items)} images, validating on {len(val_items)} "
        f"({len({patient_of(i.path) for i in val_items})} patients held out); class weights {weights}")

    # a resume takes every weight from its checkpoint: the ImageNet file is not read again
    model = build_model(None, init="random" if resuming else init, imagenet_weights=imagenet_weights, seed=seed)
    if resuming:
        try:
            model.load_weights(last_weights)
        except Exception as exc:  # h5py and Keras raise many types for a damaged file
            raise _damaged(last_weights, exc) from exc
        log(f"resumed from {last_weights} after epoch {progress['completed_epochs']}")
    elif from_model is not None:
        model.load_weights(from_model)
        log(f"starting from the weights of {from_model}")
    # created only now, so a run refused over its data or start weights leaves no empty folders
    run.root.mkdir(parents=True, exist_ok=True)
    Path(os.path.realpath(out)).parent.mkdir(parents=True, exist_ok=True)  # --out may be a link to a new folder

    epoch_start = 0
    for index, phase in enumerate(schedule):
        epoch_end = epoch_start + phase.epochs
        is_final_phase = index == len(schedule) - 1
        if progress["completed_epochs"] >= epoch_end:
            epoch_start = epoch_end
            continue
        averaging = is_final_phase and average_last > 0
        rows = [r for r in progress["history"] if epoch_start < r["epoch"] <= epoch_end]
        # an averaging phase has no early stop and no plateau cut: nothing to replay
        so_far = PhaseProgress() if averaging else phase_progress(rows, patience)
        if so_far.stopped_early:
            log(f"phase {index + 1}/{len(schedule)} had stopped early after epoch {rows[-1]['epoch']}")
            epoch_start = epoch_end
            continue
        _set_trainable(model, phase, init)
        learning_rate = so_far.learning_rate or phase.learning_rate
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="sparse_categorical_crossentropy",
                      metrics=["accuracy", _pneumonia_auc(keras)])
        first_epoch = max(epoch_start, progress["completed_epochs"])
        if rows:
            log(_restore_optimizer(model, run.epoch_optimizer(rows[-1]["epoch"]), rows[-1]["epoch"]))
        # seeded by the first epoch to run, so a resumed phase does not replay its first epoch's shuffle
        train_ds = image_dataset(train_items, phase.size, batch_size, augment=True,
                                 seed=seed + first_epoch)
        val_ds = image_dataset(val_items, phase.size, batch_size, augment=False, seed=seed)
        callbacks = _callbacks(run, progress, phase, epoch_start, averaging, patience, so_far)
        log(f"phase {index + 1}/{len(schedule)}: {phase.size}px, epochs "
            f"{first_epoch + 1}-{epoch_end}, lr {learning_rate:g}"
            + (", backbone frozen" if phase.frozen_backbone else ""))
        try:
            model.fit(train_ds, validation_data=val_ds, class_weight=weights, verbose=2,
                      shuffle=False,  # train_ds shuffles itself
                      initial_epoch=first_epoch, epochs=epoch_end, callbacks=callbacks)
        except tf.errors.OpError as exc:  # a file removed, or no longer decoding, since it was listed
            failed_epoch = max(progress["completed_epochs"], first_epoch) + 1
            way_on = ("the epochs before it are kept: restore the file, then --resume" if progress["completed_epochs"]
                      else "no epoch had finished: restore the file, then run the same command without --resume")
            raise ValueError(f"training stopped in epoch {failed_epoch}: {_cause(exc)} ({way_on})") from exc
        epoch_start = epoch_end

    final = build_model(INPUT_SIZE, init="random", seed=seed)
    if average_last:
        last_epoch = progress["completed_epochs"]
        averaged = list(range(last_epoch - average_last + 1, last_epoch + 1))
        final.set_weights(mean_weights(final, [run.epoch_weights(e) for e in averaged]))
        _set_trainable(final, schedule[-1], init)
        log(f"averaged the weights of epochs {averaged[0]}-{averaged[-1]}; "
            "recomputing BatchNorm statistics over the training images")
        recompute_batchnorm_statistics(final, image_dataset(
            train_items, INPUT_SIZE, batch_size, augment=True, seed=seed))
        checkpoint = (f"mean of the weights of epochs {averaged[0]}-{averaged[-1]} (224 px, constant "
                      "learning rate), BatchNorm statistics recomputed over the augmented training "
                      "images")
    else:
        best_epoch = best_224_epoch(progress["history"])
        final.load_weights(run.epoch_weights(best_epoch or progress["completed_epochs"]))
        checkpoint = f"epoch {best_epoch}, the lowest validation loss at 224 px" if best_epoch else "last epoch"
    # under a temporary name first: Keras writes straight into the file it is given, and a kill
    # mid-save would leave neither the previous model nor this one
    save_atomic(out, final.save, suffix=out.suffix)
    history_csv, curves_png = _write_history(out, progress["history"])
    metadata = {
        "model": out.name,
        "sha256": sha256_of(out),
        "architecture": "DenseNet-121 backbone; head GAP, BatchNorm, Dropout 0.3, Dense 512 ReLU, "
                        "Dropout 0.2, Dense 2 softmax",
        "class_names": CLASS_NAMES,
        "pneumonia_index": PNEUMONIA_INDEX,
        "preprocessing": {
            "input_size": INPUT_SIZE,
            "input_scale": "raw",
            "description": "files decoded as screening decodes them, in training too; grey image "
                           "to 3 equal RGB channels, resized to 224x224 with Pillow's "
                           "antialiased bicubic resize (aspect squashed, as the Kermany 224 px files "
                           "were made), values 0..255; the model divides by 255 and applies ImageNet "
                           "mean/std itself",
        },
        "training": {
            "data": split["data"],
            "n_train": len(train_items),
            "n_validation": len(val_items),
            "validation_split": f"{val_fraction:g} of each class's patients held out from the train "
                                f"split (patient token from the file name), seed {seed}",
            "validation_fraction": val_fraction,
            "seed": seed,
            "init": init,
            "schedule": [asdict(p) for p in schedule],
            "batch_size": batch_size,
            "class_weights": {CLASS_NAMES[k]: round(v, 4) for k, v in weights.items()},
            "augmentation": AUGMENTATION,
            "epochs_run": len(progress["history"]),  # a phase stopped early skips its epoch numbers
            "checkpoint": checkpoint,
            "started_from": progress.get("started_from"),
            "history_csv": history_csv.name,
            "curves_png": curves_png.name,
            "limit_per_class": limit,
            # last, being long: so a model fine-tuned from this one is never validated on these patients
            "training_patients": sorted({patient_of(i.path) for i in train_items}),
        },
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "environment": {"python": platform.python_version(), "keras": keras.__version__},
    }
    write_json_atomic(metadata_path(out), metadata)
    return final, calibrate_model(out, val_items, VALIDATION_SPLIT, target_sensitivity, log=log)


def _callbacks(run: _RunFolder, progress: dict, phase: Phase, epoch_start: int, averaging: bool,
               patience: int, so_far: PhaseProgress = PhaseProgress()) -> list:
    """The Keras callbacks of one phase, starting from the counters in ``so_far``.
    The progress callback comes after the plateau callback, so the history records
    each epoch's learning rate after any cut."""
    import keras

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.best, self.wait = so_far.early_stop_best, so_far.early_stop_wait

    class ReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.best = so_far.plateau_best

    callbacks = []
    if not averaging:  # weight averaging wants every epoch, at one learning rate
        callbacks += [
            EarlyStopping(monitor="val_loss", mode="min", patience=patience,
                          min_delta=EARLY_STOP_MIN_DELTA),
            ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=PLATEAU_PATIENCE,
                              min_delta=PLATEAU_MIN_DELTA, min_lr=1e-6),
        ]
    callbacks.append(_ProgressCallback(run, progress, phase,
                                       averaged_from=epoch_start + 1 if averaging else None))
    return callbacks


def _started_from(model_path: Path) -> dict:
    """Which model a fine-tuning run started from, with that model's own training record
    (none when its metadata is missing or pins another file)."""
    model_path = Path(model_path)
    sha256 = sha256_of(model_path)
    meta_file = metadata_path(model_path)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("sha256") != sha256:
        meta = {}
    return {"model": model_path.name, "sha256": sha256,
            "training": meta.get("training"), "validation": meta.get("validation")}


def _names_digest(items: list[LabelledImage], folder: Path) -> str:
    """sha256 of the images' names under ``folder``: the same images give the same digest wherever
    the folder lies."""
    names = sorted(Path(i.path).relative_to(folder).as_posix() for i in items)
    return hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()


def _check_resume_options(progress: dict, recipe: dict, average_last: int, from_model: Path | None,
                          progress_file: Path) -> None:
    """A resume continues its run.  Without the run's --average-last it would save one epoch instead
    of the mean it was training for (with one added, the epochs to average are gone), and a start
    model other than the run's would be recorded as the start of weights that never came from it.
    Another --init, --batch-size or schedule (--frozen-epochs included) would train the remaining
    epochs otherwise than the metadata says, and could skip phases or unfreeze a frozen backbone.
    Leaving --from-model out is fine (the weights come from the checkpoint), and so are a longer
    final phase, phases added after it, and another --patience."""
    recorded = progress["average_last"]
    differing = [f"--average-last {recorded} (this run: {average_last})"] if recorded != average_last else []
    run_recipe = progress.get("recipe", recipe)
    if progress["completed_epochs"]:
        for key, option in (("init", "--init"), ("batch_size", "--batch-size")):
            if run_recipe[key] != recipe[key]:
                differing.append(f"{option} {run_recipe[key]} (this run: {recipe[key]})")
        if not _extends(recipe["schedule"], run_recipe["schedule"]):
            differing.append(f"--schedule {_shown(run_recipe['schedule'])} (this run: {_shown(recipe['schedule'])})")
    started = progress.get("started_from")
    if progress["completed_epochs"] and from_model is not None and (
            started is None or started["sha256"] != sha256_of(from_model)):
        differing.append(f"--from-model {started['model'] if started else 'none'} (this run: {Path(from_model).name})")
    if differing:
        raise OptionError(f"cannot resume: {progress_file} records a run with {'; '.join(differing)}. A "
                          "resume continues that run: give its options, or start afresh in another --run-dir")


def _extends(schedule: list[dict], recorded: list[dict]) -> bool:
    """Whether ``schedule`` is the ``recorded`` one, with its final phase as long or longer and
    perhaps more phases after it."""
    if len(schedule) < len(recorded):
        return False
    *same, last = recorded
    given = schedule[len(recorded) - 1]
    return schedule[:len(same)] == same and given["epochs"] >= last["epochs"] and \
        {**given, "epochs": 0} == {**last, "epochs": 0}


def _shown(schedule: list[dict]) -> str:
    """A schedule as --schedule spells it; a frozen-backbone phase (--frozen-epochs) marked."""
    return ",".join(f"{p['size']}:{p['epochs']}:{p['learning_rate']:g}" + (" (frozen)" if p["frozen_backbone"] else "")
                    for p in schedule)


def _check_resume_split(recorded: dict, split: dict, progress_file: Path) -> None:
    """A resume must validate on the run's own validation images (of those ``recorded``)."""
    def shown(value):
        return "none" if value is None else value

    differing = [f"{option} {shown(recorded[key])} (this run: {shown(split[key])})"
                 for key, option in SPLIT_OPTIONS.items() if key in recorded and recorded[key] != split[key]]
    if differing:
        raise OptionError(f"cannot resume: {progress_file} records a run with {'; '.join(differing)}. A "
                          "resume must keep the run's validation split: give its options, or start "
                          "afresh in another --run-dir")
    if recorded["validation_sha256"] != split["validation_sha256"]:
        raise OptionError(f"cannot resume: the validation images differ from those {progress_file} records: "
                          f"images were added, removed or renamed under {split['data']} since the run "
                          "started (or this is other data). Restore them, or start afresh in another --run-dir")


def _check_start_split(started_from: dict, items: list[LabelledImage], val_items: list[LabelledImage],
                       log=print) -> None:
    """Refuse to validate on patients the start model, or a model it was fine-tuned from, was
    trained on.  Their metadata lists them; for models from before that, the start model's training
    record rebuilds its split of ``items`` when these are its data (they split into its recorded
    sizes), wherever the folder now lies."""
    training = started_from.get("training") or {}
    trained_on = training_patients(training)
    if trained_on is None:  # a model from before the list: its record rebuilds its split of its own data
        try:
            trained_on = {patient_of(i.path) for i in recorded_split(items, training, "this data")[0]}
        except ValueError:
            log(f"cannot tell whether --from-model {started_from['model']} was trained on any of these "
                "validation images: its metadata lists no training patients, and this is not exactly its "
                "data. If it is (with images added or removed), its validation figures will be optimistic")
            return
    overlap = sum(patient_of(i.path) in trained_on for i in val_items)
    if overlap:
        raise OptionError(f"--from-model {started_from['model']} was trained on the patients of {overlap} of "
                          f"this run's {len(val_items)} validation images (it was trained with --seed "
                          f"{training.get('seed')} --val-fraction {training.get('validation_fraction')}): "
                          "its own split, or other data, is needed to validate it")


def _require_both_classes(items: list[LabelledImage], train_items: list[LabelledImage],
                          val_fraction: float) -> None:
    """Both classes must be trained and validated on.  ``split_by_patient`` holds out at least
    one patient of each class, so only training can be left without one."""
    for label, name in enumerate(CLASS_NAMES):
        patients = {patient_of(i.path) for i in items if i.label == label}
        if not patients:
            raise ValueError(f"no usable {name} images: training needs both classes")
        if not any(i.label == label for i in train_items):
            raise OptionError(f"--val-fraction {val_fraction:g} holds out all {len(patients)} {name} "
                              f"patient(s) for validation and leaves none to train on: each class needs "
                              f"patients in both parts (a smaller --val-fraction, or more {name} patients)")


def _cause(error) -> str:
    """The Python error inside a TensorFlow error (raised in a tf.data function: its traceback's
    last line), else the first line."""
    lines = [line.strip() for line in error.message.splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"\w+(Error|Exception): ", line)]
    return raised[-1] if raised else lines[0] if lines else type(error).__name__


def _damaged(path: Path, exc: Exception, way_on: str = "") -> ValueError:
    """A resume's refusal of a checkpoint file that cannot be read, naming it."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ValueError(f"cannot resume: {path} is damaged ({reason})" + (f"; {way_on}" if way_on else ""))


def best_224_epoch(history: list[dict]) -> int | None:
    """The 224 px epoch with the lowest validation loss (the first, on a tie).

    Validation loss, not ROC-AUC: on this data the AUC saturates near 0.99 and moves by
    noise between epochs, while the loss also tells calibrated checkpoints from ones
    that push most pneumonia cases far below 0.5.
    """
    rows = [r for r in history if r["size"] == INPUT_SIZE]  # every epoch validates: never an empty split
    return min(rows, key=lambda r: r["val_loss"])["epoch"] if rows else None


def _save_optimizer(optimizer, path: Path) -> None:
    """Adam's step count, learning rate and moments (a weights checkpoint holds none of them)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(v) for v in optimizer.variables])
    write_atomic(path, buffer.getvalue())


def _restore_optimizer(model, path: Path, epoch: int) -> str:
    """Load the state ``_save_optimizer`` wrote after ``epoch`` into the model's new optimiser,
    and say for the log what became of it."""
    import numpy as np

    if not Path(path).is_file():
        return f"no optimiser state saved after epoch {epoch}: Adam restarts"
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    try:
        with np.load(path) as saved:
            arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    except Exception as exc:  # zipfile, zlib and numpy raise many types for a damaged file
        raise _damaged(path, exc, "delete it to go on with a fresh Adam state") from exc
    if [a.shape for a in arrays] != [tuple(v.shape) for v in optimizer.variables]:
        return (f"the optimiser state saved after epoch {epoch} ({path.name}) belongs to other "
                "trainable variables: Adam restarts")
    for variable, array in zip(optimizer.variables, arrays):
        variable.assign(array)
    return f"restored the optimiser state of epoch {epoch}"


def mean_weights(model, weight_files: list[Path]) -> list:
    """The element-wise mean of several checkpoints of ``model``'s architecture."""
    import numpy as np

    missing = [str(f) for f in weight_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"weights to average are missing: {', '.join(missing)}")
    total = None
    for weight_file in weight_files:
        model.load_weights(weight_file)
        arrays = [np.asarray(w, dtype=np.float64) for w in model.get_weights()]
        total = arrays if total is None else [t + a for t, a in zip(total, arrays)]
    return [(t / len(weight_files)).astype(np.float32) for t in total]


def recompute_batchnorm_statistics(model, dataset) -> None:
    """Set every BatchNorm layer's moving mean and variance to their means over ``dataset``.

    Averaged weights come with moving statistics that belong to none of the
    averaged epochs.  One pass in training mode, with each layer's momentum set
    to seen / (seen + batch size), turns the moving average into a mean over all
    images.  Eager calls, so the momentum is read at every batch.  Layers that
    are not trainable (a frozen ImageNet stem) run in inference mode and keep theirs.
    """
    import keras

    layers = [layer for layer in _all_layers(model)
              if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    seen = 0
    try:
        for images, _ in dataset:
            batch = int(images.shape[0])
            for layer in layers:
                layer.momentum = seen / (seen + batch)
            model(images, training=True)
            seen += batch
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _take_each_class(items: list[LabelledImage], n: int) -> list[LabelledImage]:
    taken = []
    for label in range(len(CLASS_NAMES)):
        taken += [i for i in items if i.label == label][:n]
    return taken


def _ProgressCallback(run: _RunFolder, progress: dict, phase: Phase, averaged_from: int | None):
    """A Keras callback that, after every epoch, saves the epoch's weights and
    optimiser state, then the progress file that names them, then removes the
    files it no longer needs: it keeps the last epoch, the best 224 px epoch and,
    in an averaging phase, every epoch from ``averaged_from`` on."""
    import keras

    class ProgressCallback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            done = epoch + 1
            logs = dict(logs or {})
            row = {"epoch": done, "size": phase.size,
                   "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))}
            row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
            self.model.save_weights(run.epoch_weights(done))
            # its contents on disk before the progress file names it; its name goes with the
            # folder flush of the optimiser file's atomic write
            fsync_path(run.epoch_weights(done))
            _save_optimizer(self.model.optimizer, run.epoch_optimizer(done))
            progress["history"].append(row)
            progress["completed_epochs"] = done
            run.save_progress(progress)
            kept = {done, best_224_epoch(progress["history"])}
            if averaged_from is not None:
                kept |= set(range(averaged_from, done + 1))
            run.sweep(kept, keep_optimizer=done)

    return ProgressCallback()


def _write_history(out: Path, history: list[dict]) -> tuple[Path, Path]:
    """history CSV and a loss/accuracy/AUC curve PNG next to the model, each written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = out.with_suffix(".history.csv")
    png_path = out.with_suffix(".curves.png")
    fields = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(history)
    write_atomic(csv_path, table.getvalue())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    epochs = [r["epoch"] for r in history]
    for ax, key in zip(axes, ("loss", "accuracy", "auc")):
        ax.plot(epochs, [r.get(key) for r in history], marker="o", label="train")
        ax.plot(epochs, [r.get(f"val_{key}") for r in history], marker="o", label="validation")
        ax.set_title(key + (" (log scale)" if key == "loss" else ""))
        if key == "loss":  # the first epochs' losses would flatten every later difference
            ax.set_yscale("log")
        ax.set_xlabel("epoch (resolution in the history CSV)")
        ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=90)
    plt.close(fig)
    write_atomic(png_path, image.getvalue())
    return csv_path, png_path
