"""Command line: option parsing and wiring only; the work lives in the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .model import DEFAULT_MODEL


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pneumonia_batch")
def main() -> None:
    """pneumonia_batch: screen chest X-ray studies, and train, evaluate and calibrate its model."""


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_MODEL,
              show_default=True, help="Model file to write (.keras); metadata goes beside it as .json.")
@click.option("--schedule", default="96:4:1e-3,128:1:3e-4,224:1:1e-4", show_default=True,
              help="Progressive resizing: comma-separated size:epochs:learning-rate, ending at 224.")
@click.option("--init", type=click.Choice(["random", "imagenet"]), default="random", show_default=True,
              help="Backbone start: from scratch, or ImageNet weights from --imagenet-weights.")
@click.option("--imagenet-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Keras DenseNet-121 no-top ImageNet weight file (densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5).")
@click.option("--frozen-epochs", default=2, show_default=True,
              help="With --init imagenet: epochs training the head on a frozen backbone first.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--val-fraction", default=0.1, show_default=True,
              help="Share of each class's patients held out of the train split for validation.")
@click.option("--seed", default=0, show_default=True)
@click.option("--patience", default=3, show_default=True, help="Early stopping patience (epochs, per phase).")
@click.option("--target-sensitivity", default=0.97, show_default=True,
              help="Pneumonia sensitivity the threshold is calibrated for on the validation split.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Checkpoint folder (default runs/<model name>).")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--limit", type=int, help="Use at most this many images per class (smoke runs).")
def train(data_dir, out, schedule, init, imagenet_weights, frozen_epochs, batch_size, val_fraction,
          seed, patience, target_sensitivity, run_dir, resume, limit):
    """Train the DenseNet-121 classifier on DATA_DIR/{train/}{NORMAL,PNEUMONIA}.

    \b
    Example:
      python -m pneumonia_batch train ../shared/data/kermany224 --out weights/densenet121_pneumonia.keras
    """
    from .train import parse_schedule, train as run_training

    try:
        phases = parse_schedule(schedule)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--schedule")
    run_training(data_dir, out, phases, init=init, imagenet_weights=imagenet_weights,
                 frozen_epochs=frozen_epochs, batch_size=batch_size, val_fraction=val_fraction,
                 seed=seed, run_dir=run_dir, resume=resume, patience=patience, limit=limit,
                 target_sensitivity=target_sensitivity, log=lambda m: click.echo(m, err=True))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
@click.option("--target-sensitivity", default=0.97, show_default=True)
def calibrate(data_dir, model_path, target_sensitivity):
    """Re-choose the model's threshold on the validation split it was trained with.

    DATA_DIR is the training data; the validation split is rebuilt from the
    patient split recorded in the model's metadata.
    """
    import json

    from .dataset import list_labelled, resolve_split, split_by_patient
    from .evaluate import calibrate_model
    from .model import metadata_path

    training = json.loads(metadata_path(model_path).read_text())["training"]
    _, val_items = split_by_patient(list_labelled(resolve_split(data_dir, "train")),
                                    training["validation_fraction"], training["seed"])
    calibrate_model(model_path, val_items, target_sensitivity, log=lambda m: click.echo(m, err=True))


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_MODEL, show_default=True)
@click.option("--split", default="test", show_default=True,
              help="Split folder to use when DATA_DIR has train/val/test subfolders.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("evaluation"),
              show_default=True, help="Where evaluation.json, roc.png and confusion.png go.")
def evaluate(data_dir, model_path, split, out_dir):
    """Evaluate the model on a labelled folder DATA_DIR/{NORMAL,PNEUMONIA}."""
    from .dataset import list_labelled, resolve_split
    from .evaluate import evaluate as run_evaluation, format_table

    result = run_evaluation(model_path, list_labelled(resolve_split(data_dir, split)), out_dir)
    click.echo(format_table(result))
    click.echo(f"written to {out_dir}/", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
