"""Labelled folders: every file used or listed with why, read the way screening reads it."""

import shutil

import pytest

from pneumonia_batch.dataset import (TRAINING_KINDS, class_folder_holding, list_labelled, list_training,
                                     rebuild_validation_split, resolve_split, split_by_patient, training_patients)
from pneumonia_batch.discover import count_reasons
from tests.dicom_factory import EXAMPLES, chest_pixels, make_dataset, save

NORMAL_JPEG = EXAMPLES / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg"


@pytest.fixture
def local_folder(tmp_path):
    """A hospital's own labelled set: JPEG exports and DICOM studies in folders, plus litter."""
    normal, pneumonia = tmp_path / "NORMAL", tmp_path / "PNEUMONIA" / "study-7"
    normal.mkdir()
    pneumonia.mkdir(parents=True)
    (normal / "a.jpeg").write_bytes(NORMAL_JPEG.read_bytes())
    save(make_dataset(chest_pixels(64)), pneumonia / "frontal")  # no suffix, as archives send them
    save(make_dataset(chest_pixels(64), view="LL"), pneumonia / "lateral.dcm")
    (pneumonia / "notes.txt").write_text("reported by Dr X")
    (normal / "empty.dcm").write_bytes(b"")
    shutil.copy(pneumonia / "frontal", pneumonia / "frontal-again.dcm")  # the archive sent it twice
    return tmp_path


def test_local_folder_lists_every_file_as_used_or_with_its_reason(local_folder):
    items, unused = list_labelled(local_folder)
    used = {item.path.relative_to(local_folder).as_posix(): (item.label, item.kind) for item in items}
    assert used == {"NORMAL/a.jpeg": (0, "jpeg"), "PNEUMONIA/study-7/frontal": (1, "dicom")}
    reasons = {u.path.relative_to(local_folder).as_posix(): u.reason for u in unused}
    assert reasons == {"NORMAL/empty.dcm": "error: empty file",
                       "PNEUMONIA/study-7/lateral.dcm": "not_frontal_view",
                       "PNEUMONIA/study-7/frontal-again.dcm": "duplicate_instance_of PNEUMONIA/study-7/frontal",
                       "PNEUMONIA/study-7/notes.txt": "not_an_image"}
    assert count_reasons(u.reason for u in unused) == ("error: empty file (1); duplicate_instance_of "
                                                       "PNEUMONIA/study-7/frontal (1); not_frontal_view (1); "
                                                       "not_an_image (1)")  # in the order met


def test_a_data_set_assembled_from_symlinks_is_read(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "x.jpeg").write_bytes(NORMAL_JPEG.read_bytes())
    (tmp_path / "set" / "NORMAL").mkdir(parents=True)
    (tmp_path / "set" / "NORMAL" / "x.jpeg").symlink_to(tmp_path / "pool" / "x.jpeg")
    items, unused = list_labelled(tmp_path / "set")
    assert [(i.path.name, i.label) for i in items] == [("x.jpeg", 0)] and unused == []


def test_one_file_under_several_names_is_used_once_and_a_file_under_both_classes_not_at_all(tmp_path):
    """Links and hard links would count an image twice; one filed as both normal and pneumonia has
    no label to trust.  What sits beside the class folders is listed, not passed over."""
    import os

    normal, pneumonia = tmp_path / "NORMAL", tmp_path / "PNEUMONIA"
    for folder in (normal, pneumonia, tmp_path / "Pneumonia_viral"):
        folder.mkdir()
    for path in (normal / "a.jpeg", normal / "c.jpeg", pneumonia / "b.jpeg", tmp_path / "Pneumonia_viral" / "d.jpeg",
                 tmp_path / "stray.jpeg"):
        shutil.copy(NORMAL_JPEG, path)
    (normal / "link.jpeg").symlink_to(normal / "a.jpeg")
    os.link(normal / "a.jpeg", normal / "hard.jpeg")
    (pneumonia / "cross.jpeg").symlink_to(normal / "c.jpeg")
    items, unused = list_labelled(tmp_path)
    assert [(item.path.relative_to(tmp_path).as_posix(), item.label) for item in items] == [
        ("NORMAL/a.jpeg", 0), ("PNEUMONIA/b.jpeg", 1)]
    conflict = ("label_conflict: the same file is filed under both classes "
                "(NORMAL/c.jpeg; PNEUMONIA/cross.jpeg)")
    assert {u.path.relative_to(tmp_path).as_posix(): u.reason for u in unused} == {
        "NORMAL/hard.jpeg": "duplicate_of NORMAL/a.jpeg", "NORMAL/link.jpeg": "duplicate_of NORMAL/a.jpeg",
        "NORMAL/c.jpeg": conflict, "PNEUMONIA/cross.jpeg": conflict,
        "Pneumonia_viral": "outside_class_folders", "stray.jpeg": "outside_class_folders"}


def test_a_dicom_instance_sent_into_both_class_folders_is_not_used(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "PNEUMONIA").mkdir()
    ds = make_dataset(chest_pixels(64))
    save(ds, tmp_path / "NORMAL" / "a.dcm")
    save(ds, tmp_path / "PNEUMONIA" / "b.dcm")  # the same SOPInstanceUID, a file of its own
    shutil.copy(NORMAL_JPEG, tmp_path / "NORMAL" / "c.jpeg")
    items, unused = list_labelled(tmp_path)
    assert [item.path.name for item in items] == ["c.jpeg"]
    conflict = "label_conflict: the same DICOM instance is filed under both classes (NORMAL/a.dcm; PNEUMONIA/b.dcm)"
    assert {u.path.name: u.reason for u in unused} == {"a.dcm": conflict, "b.dcm": conflict}


def test_training_uses_only_what_its_pipeline_decodes(local_folder):
    items, unused = list_labelled(local_folder, TRAINING_KINDS)
    assert [item.path.name for item in items] == ["a.jpeg"]
    assert "dicom_not_used_for_training" in {u.reason for u in unused}


def test_training_images_that_do_not_decode_are_set_aside_with_their_error(tmp_path):
    """A truncated JPEG would stop training inside an epoch: it is listed unused, with the error
    screening would report for it, before any training."""
    for name in ("NORMAL/IM-0001-0001.jpeg", "PNEUMONIA/person1_virus_1.jpeg", "PNEUMONIA/person2_virus_2.jpeg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(NORMAL_JPEG.read_bytes())
    (tmp_path / "PNEUMONIA" / "person2_virus_2.jpeg").write_bytes(NORMAL_JPEG.read_bytes()[:20000])
    items, unused = list_training(tmp_path)
    assert [(i.path.name, i.label) for i in items] == [("IM-0001-0001.jpeg", 0), ("person1_virus_1.jpeg", 1)]
    assert [(u.path.name, u.reason) for u in unused] == [
        ("person2_virus_2.jpeg", "error: OSError: image file is truncated (6 bytes not processed)")]


def test_a_folder_without_usable_images_is_an_error(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no usable images"):
        list_labelled(tmp_path)


def test_class_folders_are_found_whatever_their_case(tmp_path):
    for folder in ("normal", "Pneumonia"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpeg").write_bytes(NORMAL_JPEG.read_bytes())
    items, _ = list_labelled(tmp_path)
    assert sorted((i.path.parent.name, i.label) for i in items) == [("Pneumonia", 1), ("normal", 0)]


def test_an_output_in_a_class_folder_existing_or_not_is_found(tmp_path):
    """Plots written there would be read as X-rays of that class: in DATA/CLASS or DATA/split/CLASS,
    in any case, named through a link or not; deeper class-like names are nobody's class folder."""
    data = tmp_path / "data"
    (data / "test" / "NORMAL").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(data)
    assert class_folder_holding(data / "NORMAL" / "ev", data) == data / "NORMAL"
    assert class_folder_holding(data / "test" / "normal" / "ev", data) == data / "test" / "normal"
    assert class_folder_holding(tmp_path / "alias" / "pneumonia" / "ev", data) == data / "pneumonia"
    assert class_folder_holding(data / "reports" / "x" / "normal" / "ev", data) is None
    assert class_folder_holding(data / "evaluation", data) is None
    assert class_folder_holding(tmp_path / "normal" / "ev", data) is None  # beside DATA_DIR


def test_a_missing_split_is_named(tmp_path):
    (tmp_path / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    assert resolve_split(tmp_path, "train") == tmp_path / "train"
    assert resolve_split(tmp_path / "train", "test") == tmp_path / "train"  # class folders right there
    with pytest.raises(FileNotFoundError, match=r"neither a test split .*\(its folders: train, val\)"):
        resolve_split(tmp_path, "test")


def test_validation_split_is_rebuilt_only_from_the_data_it_was_made_of(tmp_path):
    for n in range(10):  # ten patients a class
        for label, name in (("NORMAL", f"IM-{n:04d}-0001.jpeg"), ("PNEUMONIA", f"person{n}_virus_{n}.jpeg")):
            (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "train" / label / name).write_bytes(NORMAL_JPEG.read_bytes())
    # an eleventh patient whose only file is cut off: training left it out, and so does the rebuild
    (tmp_path / "train" / "NORMAL" / "IM-0010-0001.jpeg").write_bytes(NORMAL_JPEG.read_bytes()[:20000])
    training = {"validation_fraction": 0.2, "seed": 3, "n_train": 16, "n_validation": 4}
    items, _ = list_training(tmp_path / "train")
    assert rebuild_validation_split(tmp_path, training) == split_by_patient(items, 0.2, 3)[1]
    (tmp_path / "train" / "NORMAL" / "IM-0000-0001.jpeg").unlink()
    with pytest.raises(ValueError, match="splits into 15 training and 4 validation images, but the model was "
                                         "trained on 16 and validated on 4"):
        rebuild_validation_split(tmp_path, training)
    with pytest.raises(ValueError, match="trained with --limit 4"):
        rebuild_validation_split(tmp_path, {**training, "limit_per_class": 4})
    with pytest.raises(ValueError, match="lacks 'seed'"):
        rebuild_validation_split(tmp_path, {"validation_fraction": 0.2})


def test_training_patients_are_gathered_along_the_fine_tuning_chain():
    start = {"training_patients": ["person1", "IM-0001"]}
    unlisted = {"started_from": {"training": start}}  # a model from before the list, fine-tuned from start
    tuned = {"training_patients": ["person2"], "started_from": {"training": unlisted}}
    assert training_patients(tuned) == {"person1", "person2", "IM-0001"}
    assert training_patients(unlisted) == {"person1", "IM-0001"}
    assert training_patients({"started_from": {}}) is None  # nobody listed: unknown
    assert training_patients(None) is None  # a model without a training record
