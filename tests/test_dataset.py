"""Labelled folders: every file used or listed with why, read the way screening reads it."""

import shutil

import pytest

from pneumonia_batch.dataset import TRAINING_KINDS, list_labelled
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


def test_training_uses_only_what_its_pipeline_decodes(local_folder):
    items, unused = list_labelled(local_folder, TRAINING_KINDS)
    assert [item.path.name for item in items] == ["a.jpeg"]
    assert "dicom_not_used_for_training" in {u.reason for u in unused}


def test_a_folder_without_usable_images_is_an_error(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no usable images"):
        list_labelled(tmp_path)
