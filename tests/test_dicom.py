"""The DICOM grey pipeline and header eligibility, on fixtures built from a real radiograph."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEG2000, JPEG2000Lossless,
                         JPEGLSLossless, RLELossless)

from pneumonia_batch import dicom
from pneumonia_batch.preprocess import (DECODE_MIN_SIDE, NothingToScreen, grey_to_image, model_input_from_file,
                                        to_model_input)
from tests.dicom_factory import (EXAMPLES, chest_pixels, make_dataset, save, save_jpeg_baseline,
                                 save_without_meta)


@pytest.fixture(scope="module")
def pixels():
    return chest_pixels()


def grey_of(path):
    return dicom.decode_grey(path)[0]


def test_monochrome1_is_inverted_after_voi(tmp_path, pixels):
    window = dict(WindowCenter=1800, WindowWidth=3000)
    mono2 = grey_of(save(make_dataset(pixels, **window), tmp_path / "m2.dcm"))
    mono1 = grey_of(save(make_dataset(pixels, photometric="MONOCHROME1", **window), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # The contrast is not flat: the window spreads the chest over most of the range.
    assert mono2.std() > 0.1


def test_monochrome1_twin_gives_the_same_model_input(tmp_path, pixels):
    twin = (4095 - pixels).astype(np.uint16)
    a = save(make_dataset(pixels), tmp_path / "m2.dcm")
    b = save(make_dataset(twin, photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    np.testing.assert_array_equal(model_input_from_file(str(a), "dicom")[0],
                                  model_input_from_file(str(b), "dicom")[0])


def test_linear_window_follows_the_standard(tmp_path):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    grey = grey_of(save(make_dataset(ramp, WindowCenter=1000, WindowWidth=501), tmp_path / "w.dcm"))
    flat = grey.ravel()
    # PS3.3 C.11.2.1.2.1: x <= c - 0.5 - (w-1)/2 -> min, x > c - 0.5 + (w-1)/2 -> max.
    assert flat[749] == 0.0 and flat[750] > 0.0
    assert flat[1249] < 1.0 and flat[1250] == 1.0
    assert flat[1000] == pytest.approx((1000 - 999.5) / 500 + 0.5)


def test_sigmoid_and_linear_exact_functions(tmp_path):
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    sigmoid = grey_of(save(make_dataset(ramp, WindowCenter=2000, WindowWidth=400,
                                        VOILUTFunction="SIGMOID"), tmp_path / "s.dcm")).ravel()
    assert sigmoid[2000] == pytest.approx(0.5)
    assert sigmoid[2100] == pytest.approx(1 / (1 + np.exp(-1.0)))
    exact = grey_of(save(make_dataset(ramp, WindowCenter=2000, WindowWidth=400,
                                      VOILUTFunction="LINEAR_EXACT"), tmp_path / "e.dcm")).ravel()
    assert exact[2100] == pytest.approx(0.75)


def test_first_of_several_windows_is_used(tmp_path, pixels):
    several = grey_of(save(make_dataset(pixels, WindowCenter=[1500, 3000], WindowWidth=[2000, 100]),
                           tmp_path / "a.dcm"))
    first = grey_of(save(make_dataset(pixels, WindowCenter=1500, WindowWidth=2000), tmp_path / "b.dcm"))
    np.testing.assert_array_equal(several, first)


def test_rescale_is_applied_before_the_window(tmp_path, pixels):
    rescaled = make_dataset(pixels, RescaleSlope=2, RescaleIntercept=-1000,
                            WindowCenter=2 * 1800 - 1000, WindowWidth=2 * 3000)
    direct = make_dataset((2 * pixels.astype(np.int32) - 1000).astype(np.int16), bits_stored=16,
                          signed=True, WindowCenter=2 * 1800 - 1000, WindowWidth=2 * 3000)
    np.testing.assert_allclose(grey_of(save(rescaled, tmp_path / "r.dcm")),
                               grey_of(save(direct, tmp_path / "d.dcm")), atol=1e-6)


def test_modality_lut_sequence_equals_its_rescale(tmp_path, pixels):
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = np.arange(0, 8192, 2, dtype="<u2").tobytes()
    with_lut = make_dataset(pixels, ModalityLUTSequence=[item], WindowCenter=3600, WindowWidth=6000)
    with_rescale = make_dataset(pixels, RescaleSlope=2, RescaleIntercept=0,
                                WindowCenter=3600, WindowWidth=6000)
    np.testing.assert_allclose(grey_of(save(with_lut, tmp_path / "l.dcm")),
                               grey_of(save(with_rescale, tmp_path / "r.dcm")), atol=1e-6)


def test_voi_lut_sequence_is_scaled_by_its_output_bits(tmp_path, pixels):
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = (4095 - np.arange(4096)).astype("<u2").tobytes()  # reverses contrast
    grey = grey_of(save(make_dataset(pixels, VOILUTSequence=[item]), tmp_path / "v.dcm"))
    np.testing.assert_allclose(grey, (4095 - pixels) / 4095.0, atol=1e-6)


def test_an_8_bit_voi_lut_over_12_bit_values_is_looked_up_at_every_value(tmp_path, pixels):
    """Older CR systems send VOI LUTs with 8-bit output; their 4096 entries must all be reachable."""
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = np.round(np.arange(4096) * 255 / 4095).astype("<u2").tobytes()
    grey = grey_of(save(make_dataset(pixels, VOILUTSequence=[item]), tmp_path / "v8.dcm"))
    np.testing.assert_allclose(grey, np.round(pixels.astype(np.int64) * 255 / 4095) / 255, atol=1e-6)
    assert pixels.max() > 3000  # the test reaches entries far past 255


def test_no_voi_scales_by_the_actual_range_not_the_dtype(tmp_path, pixels):
    narrow = (pixels // 4).astype(np.uint16)  # a 10-bit image in 16-bit storage
    grey = grey_of(save(make_dataset(narrow, bits_stored=16), tmp_path / "n.dcm"))
    assert grey.min() == 0.0 and grey.max() == 1.0


def test_signed_pixels(tmp_path, pixels):
    signed = (pixels.astype(np.int32) - 2048).astype(np.int16)
    a = grey_of(save(make_dataset(signed, bits_stored=16, signed=True), tmp_path / "s.dcm"))
    b = grey_of(save(make_dataset(pixels), tmp_path / "u.dcm"))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_lossless_syntaxes_decode_to_identical_pixels(tmp_path, pixels, syntax):
    reference = grey_of(save(make_dataset(pixels), tmp_path / "ref.dcm"))
    compressed = save(make_dataset(pixels), tmp_path / "c.dcm", syntax=syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(grey_of(compressed), reference)


def test_deflated_syntax(tmp_path, pixels):
    ds = make_dataset(pixels)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = save(ds, tmp_path / "dfl.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_deflated
    np.testing.assert_array_equal(grey_of(path), grey_of(save(make_dataset(pixels), tmp_path / "r.dcm")))


def test_lossy_syntaxes_agree_within_tolerance(tmp_path, pixels):
    window = dict(WindowCenter=2048, WindowWidth=4096)
    reference = grey_of(save(make_dataset(pixels, **window), tmp_path / "ref.dcm"))
    j2k = grey_of(save(make_dataset(pixels, **window), tmp_path / "j2k.dcm", syntax=JPEG2000, j2k_cr=[20]))
    assert np.abs(j2k - reference).mean() < 0.01
    eight = (pixels // 16).astype(np.uint8)
    window = dict(WindowCenter=128, WindowWidth=256)
    ref8 = grey_of(save(make_dataset(eight, bits_stored=8, **window), tmp_path / "r8.dcm"))
    jpeg = grey_of(save_jpeg_baseline(make_dataset(eight, bits_stored=8, **window), tmp_path / "jpg.dcm"))
    assert np.abs(jpeg - ref8).mean() < 0.01


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_pydicom_reference_encodings_agree(name):
    np.testing.assert_array_equal(grey_of(get_testdata_file(name)),
                                  grey_of(get_testdata_file("MR_small.dcm")))


def test_jpeg_lossless_process14_decodes():
    grey = grey_of(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    rle = grey_of(get_testdata_file("SC_rgb_rle.dcm"))
    np.testing.assert_allclose(grey, rle, atol=1e-6)


def test_file_without_preamble_or_meta(tmp_path, pixels):
    bare = save_without_meta(make_dataset(pixels), tmp_path / "bare")
    assert open(bare, "rb").read(132)[128:132] != b"DICM"
    header = dicom.read_header(bare)
    assert header.modality == "DX" and header.transfer_syntax_uid == "1.2.840.10008.1.2"
    np.testing.assert_array_equal(grey_of(bare), grey_of(save(make_dataset(pixels), tmp_path / "r.dcm")))


def test_multiframe_uses_the_first_frame(tmp_path, pixels):
    frames = np.stack([pixels, 4095 - pixels, pixels // 2])
    grey, note = dicom.decode_grey(save(make_dataset(frames), tmp_path / "mf.dcm"))
    np.testing.assert_array_equal(grey, grey_of(save(make_dataset(pixels), tmp_path / "one.dcm")))
    assert note == "first of 3 frames"


def test_rgb_secondary_capture_becomes_grey(tmp_path, pixels):
    eight = (pixels // 16).astype(np.uint8)
    rgb = np.repeat(eight[:, :, None], 3, axis=2)
    colour = make_dataset(rgb, photometric="RGB", bits_stored=8, sop_class=dicom.SECONDARY_CAPTURE)
    grey = grey_of(save(colour, tmp_path / "rgb.dcm"))
    np.testing.assert_allclose(grey, eight / 255.0, atol=1e-5)


@pytest.mark.parametrize("entry_scale", [257, 1], ids=["16-bit entries", "8-bit entries in 16-bit words"])
def test_a_palette_image_is_scaled_by_its_palette_not_its_brightest_pixel(tmp_path, pixels, entry_scale):
    """A dark image must stay dark: it uses only the lower half of a grey palette."""
    indices = (pixels // 32).astype(np.uint8)  # 0..127 of the palette's 256 entries
    ds = make_dataset(indices, photometric="PALETTE COLOR", bits_stored=8, sop_class=dicom.SECONDARY_CAPTURE,
                      modality="CR")
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", (np.arange(256) * entry_scale).astype("<u2").tobytes())
    grey = grey_of(save(ds, tmp_path / "palette.dcm"))
    np.testing.assert_allclose(grey, indices / 255.0, atol=1e-5)
    assert grey.max() < 0.5


def test_an_empty_transfer_syntax_is_read_as_the_encoding_found(tmp_path, pixels):
    path = save(make_dataset(pixels), tmp_path / "r.dcm")
    data = path.read_bytes()
    uid = b"1.2.840.10008.1.2.1\0"
    blank = tmp_path / "blank.dcm"
    blank.write_bytes(data.replace(uid, b" " * len(uid), 1))
    assert pydicom.dcmread(blank, stop_before_pixels=True).file_meta.TransferSyntaxUID == ""
    np.testing.assert_array_equal(grey_of(blank), grey_of(path))


def test_truncated_pixel_data_is_refused(tmp_path, pixels):
    path = save(make_dataset(pixels), tmp_path / "t.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-5000])
    with pytest.raises(ValueError, match="truncated"):
        dicom.decode_grey(path)


def test_codec_failure_raises():
    with pytest.raises(Exception, match="plugins"):
        dicom.decode_grey(get_testdata_file("JPEG-lossy.dcm"))


def test_model_input_is_three_equal_channels_at_224(tmp_path, pixels):
    array, _ = model_input_from_file(str(save(make_dataset(pixels), tmp_path / "x.dcm")), "dicom")
    assert array.shape == (224, 224, 3) and array.dtype == np.uint8
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    assert array.max() > 200 and array.min() < 50


def test_resize_matches_the_training_images():
    """Training files were made with Image.open(p).convert('RGB').resize((224, 224))."""
    from PIL import Image

    from tests.dicom_factory import EXAMPLES

    source = EXAMPLES / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg"
    expected = np.asarray(Image.open(source).convert("RGB").resize((224, 224)))
    from pneumonia_batch.images import read_grey

    np.testing.assert_array_equal(to_model_input(read_grey(source)), expected)
    assert grey_to_image(np.ones((2, 2), np.float32)).getpixel((0, 0)) == 255


HEADER_CASES = [
    (dict(), None),
    (dict(body_part="", view=""), None),
    (dict(body_part="THORAX"), None),
    (dict(body_part="CHEST_AP"), None),
    (dict(modality=""), None),  # a DX SOP class says what the missing Modality would
    (dict(modality="", sop_class=dicom.CR_IMAGE), None),
    (dict(modality="", sop_class=dicom.SECONDARY_CAPTURE), "modality_missing"),
    (dict(view="LL"), "not_frontal_view"),
    (dict(view="LATERAL"), "not_frontal_view"),
    (dict(body_part="ABDOMEN"), "not_chest"),
    (dict(modality="CT"), "modality_ct"),
    (dict(modality="DX", sop_class=dicom.SECONDARY_CAPTURE), None),
    (dict(modality="OT", sop_class=dicom.SECONDARY_CAPTURE), "modality_ot"),
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.88.11"), "not_an_image_sop_class"),
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.11.1"), "not_an_image_sop_class"),  # presentation state
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.3.1", modality="US"), "modality_us"),  # an image, not a radiograph
    (dict(modality="", sop_class="1.2.840.10008.5.1.4.1.1.7.4"), "modality_missing"),  # any secondary capture
    (dict(sop_class="1.2.840.10008.5.1.4.1.1.66.4", modality="SEG"), "not_an_image_sop_class"),
]


@pytest.mark.parametrize("fields,reason", HEADER_CASES)
def test_header_eligibility(tmp_path, fields, reason):
    path = save(make_dataset(np.zeros((8, 8), np.uint16), **fields), tmp_path / "h.dcm")
    assert dicom.skip_reason(dicom.read_header(path)) == reason


def test_only_a_dicomdir_may_lack_every_identifying_element(tmp_path):
    """A file meta naming an image class does not make a header without any image identifier readable."""
    ds = make_dataset(np.zeros((8, 8), np.uint16), sop_class=dicom.CR_IMAGE)
    for keyword in ("SOPClassUID", "StudyInstanceUID", "Modality", "PatientID"):
        delattr(ds, keyword)
    with pytest.raises(pydicom.errors.InvalidDicomError, match="no DICOM identifying elements"):
        dicom.read_header(save(ds, tmp_path / "anonymous.dcm"))


def test_structured_report_from_pydicom_is_skipped():
    header = dicom.read_header(get_testdata_file("reportsi.dcm"))
    assert dicom.skip_reason(header) == "not_an_image_sop_class"


def test_16_bit_png_is_scaled_from_its_range_not_clipped(tmp_path):
    from PIL import Image

    from pneumonia_batch.images import read_grey

    stored = chest_pixels(128, bits=12)  # 12-bit values in a 16-bit PNG, as archive exports write them
    Image.fromarray(stored).save(tmp_path / "x.png")
    grey = np.asarray(read_grey(tmp_path / "x.png"), np.float64)
    expected = (stored - stored.min()) / (stored.max() - stored.min()) * 255
    assert np.abs(grey - expected).max() <= 0.5
    assert (grey == 255).mean() < 0.01


def write_png16(path, samples, colour_type):
    """A 16-bit PNG of any colour type (Pillow writes only grey ones), rows filtered None, Sub or Up
    in turn: Sub reaches back one whole pixel, so a decoder that takes a pixel's width wrong shows it."""
    import struct
    import zlib

    rows = samples.reshape(samples.shape[0], -1).astype(">u2").view(np.uint8).astype(np.int64)
    pixel_bytes = rows.shape[1] // samples.shape[1]
    lines = []
    for y, row in enumerate(rows):
        kind = y % 3
        left = np.concatenate([np.zeros(pixel_bytes, np.int64), row[:-pixel_bytes]])
        filtered = (row, row - left, row - (rows[y - 1] if y else 0))[kind] % 256
        lines.append(bytes([kind]) + filtered.astype(np.uint8).tobytes())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(lines)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("colour_type", [4, 2, 6], ids=["grey+alpha", "RGB", "RGBA"])
def test_a_16_bit_colour_png_reads_as_its_16_bit_grey_twin(tmp_path, colour_type):
    """Pillow keeps only the high byte of these samples: 12-bit values would be scored near black."""
    from pneumonia_batch.images import read_grey

    stored = chest_pixels(128, bits=12)
    opaque = np.full_like(stored, 65535)
    planes = {4: [stored, opaque], 2: [stored] * 3, 6: [stored] * 3 + [opaque]}[colour_type]
    colour = read_grey(write_png16(tmp_path / "colour.png", np.dstack(planes), colour_type))
    grey = read_grey(write_png16(tmp_path / "grey.png", stored[:, :, None], 0))
    assert colour.mode == "L" and np.asarray(grey).mean() > 100
    np.testing.assert_allclose(np.asarray(colour, float), np.asarray(grey, float), atol=1)


def test_a_jpeg_stored_sideways_with_an_orientation_tag_is_read_upright(tmp_path):
    from PIL import Image

    from pneumonia_batch.images import read_grey

    upright = read_grey(EXAMPLES / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    sideways.save(tmp_path / "phone.jpeg", exif=exif, quality=95)
    read = read_grey(tmp_path / "phone.jpeg")
    assert read.size == upright.size != sideways.size
    assert np.abs(np.asarray(read, float) - np.asarray(upright, float)).mean() < 2


def test_half_resolution_jpeg2000_scales_by_the_codestreams_bit_depth(tmp_path):
    """A 12-bit image in a 16-bit codestream, as some archives write it: not scored near black."""
    import openjpeg
    from pydicom.encaps import encapsulate

    pixels = chest_pixels(1400)  # 12-bit values; 1400 px allows the half-resolution decode
    ds = make_dataset(pixels, WindowCenter=2048, WindowWidth=4096)
    ds.PixelData = encapsulate([openjpeg.encode(pixels, bits_stored=16, use_mct=False)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    path = save(ds, tmp_path / "j2k16.dcm")
    full = grey_of(path)
    half, _ = dicom.decode_grey(path, min_side=672)
    assert half.shape == (700, 700)
    assert full.mean() > 0.5 and abs(half.mean() - full.mean()) < 0.005


def test_an_unwindowed_lossless_jpeg2000_copy_gives_the_model_the_same_input_as_the_uncompressed(tmp_path):
    """Scaled by its own range, an image must not take the half-resolution path, whose low-pass band
    averages a single hot detector pixel away and so stretches the contrast differently."""
    pixels = chest_pixels(1400) // 2
    pixels[700, 700] = 4095
    inputs = [model_input_from_file(str(save(make_dataset(pixels.copy()), tmp_path / f"{i}.dcm", syntax)), "dicom")[0]
              for i, syntax in enumerate((None, JPEG2000Lossless))]
    np.testing.assert_array_equal(inputs[1], inputs[0])
    assert inputs[0].mean() < 100  # the hot pixel keeps the rest of the image in the lower half


def test_a_palette_jpeg2000_image_is_not_read_at_half_resolution(tmp_path):
    """The low-pass band averages palette indices, which are not brightnesses: here 0 and 200 sit
    on either side of an edge and the entries between them are black."""
    indices = np.zeros((1400, 1400), np.uint8)
    indices[:, 700:] = 200
    entries = np.zeros(256, np.uint16)
    entries[200] = 65535

    def palette_file(name, syntax=None):
        ds = make_dataset(indices, photometric="PALETTE COLOR", bits_stored=8,
                          sop_class=dicom.SECONDARY_CAPTURE, modality="CR",
                          WindowCenter=128, WindowWidth=256)  # a window a palette ignores: not why it is read in full
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", entries.astype("<u2").tobytes())
        return save(ds, tmp_path / name, syntax)

    uncompressed = dicom.decode_grey(palette_file("u.dcm"), DECODE_MIN_SIDE)[0]  # two greys: blank to the model
    j2k = dicom.decode_grey(palette_file("j.dcm", JPEG2000Lossless), DECODE_MIN_SIDE)[0]
    np.testing.assert_array_equal(j2k, uncompressed)


def test_values_above_a_voi_lut_take_its_last_entry_however_far_above(tmp_path):
    """Values more than 65535 above the LUT's first mapped value must not wrap round to dark."""
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = np.linspace(0, 65535, 4096).astype("<u2").tobytes()
    stored = np.array([[0, 3000, 65535]], np.uint16)
    ds = make_dataset(stored, bits_stored=16, RescaleSlope=1, RescaleIntercept=1000, VOILUTSequence=[item])
    grey = grey_of(save(ds, tmp_path / "above.dcm"))
    np.testing.assert_allclose(grey[0], [item_value / 65535 for item_value in
                                         np.linspace(0, 65535, 4096).astype(np.uint16)[[1000, 4000, 4095]]],
                               atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_a_zero_window_width_is_refused_rather_than_scored(tmp_path, pixels, function):
    ds = make_dataset(pixels, WindowCenter=2048, WindowWidth=0, VOILUTFunction=function)
    with pytest.raises(ValueError, match="window width 0.0 <= 0"):
        grey_of(save(ds, tmp_path / "w0.dcm"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom, writing the damaged fixture
@pytest.mark.parametrize("elements, refusal", [
    (dict(WindowCenter=2048, WindowWidth="NaN"), "window centre/width 2048.0/nan"),
    (dict(WindowCenter="inf", WindowWidth=4096), "window centre/width inf/4096.0"),
    (dict(RescaleSlope="NaN", RescaleIntercept=0), "RescaleSlope"),
    (dict(RescaleSlope=1, RescaleIntercept="-inf", WindowCenter=2048, WindowWidth=4096), "RescaleIntercept"),
])
def test_a_header_value_that_is_not_a_finite_number_is_refused_rather_than_scored(tmp_path, pixels,
                                                                                  elements, refusal):
    """Such a value gives a blank image (NaN, or one grey), which would be scored as if it were one."""
    with pytest.raises(ValueError, match=f"{refusal}.* is not a finite number"):
        grey_of(save(make_dataset(pixels, **elements), tmp_path / "nan.dcm"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_a_rescale_value_that_is_not_applied_does_not_refuse_the_image(tmp_path, pixels):
    """A slope without its intercept is not applied (PS3.3 C.11.1: both or neither), whatever it holds."""
    plain = grey_of(save(make_dataset(pixels), tmp_path / "plain.dcm"))
    lone_slope = grey_of(save(make_dataset(pixels, RescaleSlope="NaN"), tmp_path / "slope.dcm"))
    np.testing.assert_array_equal(lone_slope, plain)


def test_a_jpeg2000_stream_the_half_resolution_reader_refuses_is_decoded_in_full(tmp_path):
    """With its end-of-codestream marker overwritten, Pillow refuses the shipped JPEG 2000 radiograph,
    which the DICOM codec still reads whole: the faster path must not make a readable image an error row."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(EXAMPLES / "dicom" / "RG1_J2KR.dcm")
    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream.endswith(b"\xff\xd9")
    ds.PixelData = encapsulate([codestream[:-2] + b"\0\0"])
    grey, _ = dicom.decode_grey(save(ds, tmp_path / "end-marker-overwritten.dcm"), min_side=224)
    np.testing.assert_array_equal(grey, grey_of(EXAMPLES / "dicom" / "RG1_J2KR.dcm"))


def test_empty_rescale_window_or_voi_lut_sequence_is_no_transform(tmp_path, pixels):
    """Archives send optional elements empty: treated as absent, not as an error."""
    reference = grey_of(save(make_dataset(pixels), tmp_path / "plain.dcm"))
    empty = make_dataset(pixels)
    empty.WindowCenter, empty.WindowWidth = None, None
    empty.RescaleSlope, empty.RescaleIntercept = None, None
    np.testing.assert_array_equal(grey_of(save(empty, tmp_path / "w.dcm")), reference)
    empty_sequence = make_dataset(pixels, WindowCenter=2048, WindowWidth=4096)
    empty_sequence.VOILUTSequence = pydicom.Sequence([])
    windowed = grey_of(save(make_dataset(pixels, WindowCenter=2048, WindowWidth=4096), tmp_path / "win.dcm"))
    np.testing.assert_array_equal(grey_of(save(empty_sequence, tmp_path / "s.dcm")), windowed)


def test_padding_does_not_stretch_an_unwindowed_range(tmp_path, pixels):
    """PS3.3 C.7.5.1.1.2: a band of Pixel Padding Value outside the collimator is not image."""
    padded = pixels.copy()
    padded[:32] = 4095
    image = grey_of(save(make_dataset(pixels[32:].copy()), tmp_path / "image_only.dcm"))
    grey = grey_of(save(make_dataset(padded, PixelPaddingValue=4095), tmp_path / "padded.dcm"))
    np.testing.assert_allclose(grey[32:], image, atol=1e-6)
    assert (grey[:32] == 1.0).all()
    unmarked = grey_of(save(make_dataset(padded), tmp_path / "unmarked.dcm"))
    assert abs(unmarked[32:].mean() - image.mean()) > 0.01  # what the marking prevents


def png_claiming(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` grey pixels, followed by one empty row."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # outside a decode process's notes
def test_an_image_too_large_to_decode_safely_is_refused_before_decoding(tmp_path):
    """A small file may claim gigapixels (a 16000 x 16000 RLE CR of 8 MB took 4.8 GB to decode).
    One limit for every kind, Pillow's own; just under it, the file goes on to be read."""
    dicom_over = make_dataset(np.zeros((4, 4), np.uint16), Rows=10000, Columns=8948)  # 89,480,000
    with pytest.raises(NothingToScreen, match=r"^image_too_large: 8948 x 10000 pixels; .* at most 89,478,485 pixels$"):
        grey_of(save(dicom_over, tmp_path / "over.dcm"))
    dicom_under = make_dataset(np.zeros((4, 4), np.uint16), Rows=9459, Columns=9459)  # 89,472,681
    with pytest.raises(ValueError, match="pixel data truncated"):
        grey_of(save(dicom_under, tmp_path / "under.dcm"))
    with pytest.raises(NothingToScreen, match=r"^image_too_large: 9460 x 9460 pixels; "):
        model_input_from_file(png_claiming(tmp_path / "over.png", 9460, 9460), "png")
    with pytest.raises(NothingToScreen, match=r"^image_too_large: more than 178,956,970 pixels; "):
        model_input_from_file(png_claiming(tmp_path / "bomb.png", 20000, 20000), "png")
    with pytest.raises(NothingToScreen, match="^blank_image"):  # not refused for its size: read, found blank
        model_input_from_file(png_claiming(tmp_path / "under.png", 9459, 9459), "png")


def blank_cases(pixels):
    """Blank or all but blank, each as a DICOM dataset, and the note it should get."""
    constant = np.full_like(pixels, 1234)
    dead_pixel = constant.copy()
    dead_pixel[10, 10] = 4095
    marker = np.zeros_like(pixels)
    marker[20:40, 20:30] = 4095  # a burned-in R on a blank exposure
    top = int(pixels.max())
    return [
        (make_dataset(constant), "1 grey level, 100.0% of the pixels at level 0"),
        (make_dataset(constant, RescaleSlope=0, RescaleIntercept=100, WindowCenter=2048, WindowWidth=4096),
         "1 grey level, 100.0% of the pixels at level 6"),
        (make_dataset(constant, PixelPaddingValue=1234), "1 grey level, 100.0% of the pixels at level 0"),
        (make_dataset(pixels, WindowCenter=top + 100, WindowWidth=10), "1 grey level, 100.0% of the pixels at level 0"),
        (make_dataset(dead_pixel), "2 grey levels, 99.9% of the pixels at level 0"),
        (make_dataset(marker), "2 grey levels, 99.8% of the pixels at level 0"),
        # only the brightest few values inside the window: a handful of levels
        (make_dataset(pixels, WindowCenter=top - 3, WindowWidth=8), None),
    ]


@pytest.mark.parametrize("case", range(7))
def test_a_blank_dicom_image_is_skipped_rather_than_scored(tmp_path, pixels, case):
    """Scored, a blank image comes out as a confident pneumonia finding (0.999 from the shipped model)."""
    ds, detail = blank_cases(pixels)[case]
    with pytest.raises(NothingToScreen) as refused:
        model_input_from_file(save(ds, tmp_path / "blank.dcm"), "dicom")
    assert refused.value.reason == "blank_image"
    assert detail is None or refused.value.detail == detail


def test_real_radiographs_are_not_blank_however_windowed(tmp_path, pixels):
    """The shipped examples, and the fixture's radiograph through a narrow window over its lung fields
    (the fixture's stored values are 8-bit ones times 16: a quarter of its range holds 64 of them)."""
    for path in sorted(EXAMPLES.rglob("*")):
        if path.suffix in (".jpeg", ".png", ".dcm"):
            model_input_from_file(path, "dicom" if path.suffix == ".dcm" else path.suffix[1:])
    narrow = make_dataset(pixels, WindowCenter=int(np.median(pixels)), WindowWidth=1024)
    array, _ = model_input_from_file(save(narrow, tmp_path / "narrow.dcm"), "dicom")
    assert len(np.unique(array)) > 40


def test_each_blank_rule_refuses_on_its_own_and_stops_at_its_limit():
    """Fewer than 16 grey levels however evenly spread, or 95 % of the pixels at one level however many
    levels the rest hold; one level more, or a pixel fewer at that level, is an image to score."""
    from PIL import Image

    from pneumonia_batch.preprocess import check_not_blank

    def grey(values):
        return Image.fromarray(np.asarray(values, np.uint8).reshape(100, -1))

    few = np.repeat(np.arange(0, 240, 16), 100)[:1500]  # 15 levels, under 7 % each
    check_not_blank(grey(np.append(few, [255] * 100)))  # a 16th
    with pytest.raises(NothingToScreen, match="^blank_image: 15 grey levels, 6.6% of the pixels at level 0$"):
        check_not_blank(grey(few))
    index = np.arange(10000)
    one_level = np.where(index < 9500, 7, 8 + index % 192)  # 95 % at level 7, the rest over 192 levels
    with pytest.raises(NothingToScreen, match="^blank_image: 193 grey levels, 95.0% of the pixels at level 7$"):
        check_not_blank(grey(one_level))
    one_level[0] = 6
    check_not_blank(grey(one_level))  # 94.99 %


@pytest.mark.parametrize("mode, value", [("L", 128), ("I;16", 3000), ("RGB", (40, 40, 40))])
def test_a_blank_png_or_jpeg_is_skipped_rather_than_scored(tmp_path, mode, value):
    from PIL import Image

    for suffix, kind in ((".png", "png"), (".jpeg", "jpeg")) if mode != "I;16" else ((".png", "png"),):
        path = tmp_path / f"blank{suffix}"
        Image.new(mode, (300, 200), value).save(path)
        with pytest.raises(NothingToScreen, match="^blank_image: "):
            model_input_from_file(path, kind)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom, writing the damaged fixture
@pytest.mark.parametrize("change, refusal", [
    (lambda ds: setattr(ds, "PixelData", b""), "no pixel data"),
    (lambda ds: setattr(ds, "NumberOfFrames", "-1"), "NumberOfFrames '-1' is not a number of frames"),
    (lambda ds: (setattr(ds, "FloatPixelData", ds.PixelData), delattr(ds, "PixelData")),
     "no pixel data (only FloatPixelData, which is not a radiograph's)"),
    (lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
     "PALETTE COLOR image without its palette (no Red Palette Color Lookup Table, Green Palette"),
])
def test_pixel_data_no_decoder_can_use_is_refused_in_words_a_user_can_act_on(tmp_path, change, refusal):
    """Not pydicom's internals ("object of type 'NoneType' has no len()", "'<' not supported
    between instances of 'int' and 'str'", an AttributeError)."""
    ds = make_dataset(chest_pixels(64, bits=8), bits_stored=8)
    change(ds)
    with pytest.raises(ValueError) as refused:
        grey_of(save(ds, tmp_path / "damaged.dcm"))
    assert str(refused.value).startswith(refusal)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom, reading "1.0" and "abc"
def test_a_number_of_frames_that_is_not_a_number_is_refused_in_words_a_user_can_act_on(tmp_path):
    """pydicom's own failure: "'<' not supported between instances of 'int' and 'str'".  One with a
    sign or a decimal point (PS3.5 allows "+1"; pydicom reads "1.0" as 1) is a number."""
    path = save(make_dataset(chest_pixels(64, bits=8), bits_stored=8, NumberOfFrames=98765432),
                tmp_path / "frames.dcm")
    plain = grey_of(save(make_dataset(chest_pixels(64, bits=8), bits_stored=8), tmp_path / "plain.dcm"))
    for written in (b"+1      ", b"1.0     ", b"1       "):
        path.write_bytes(path.read_bytes().replace(b"98765432", written))
        np.testing.assert_array_equal(grey_of(path), plain)
        path.write_bytes(path.read_bytes().replace(written, b"98765432"))
    path.write_bytes(path.read_bytes().replace(b"98765432", b"abc     "))
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):  # pydicom, reading the header
        with pytest.raises(ValueError, match="NumberOfFrames 'abc' is not a number of frames"):
            grey_of(path)


def test_what_a_decoder_warns_of_becomes_the_files_note_not_a_line_on_stderr(tmp_path, pixels, recwarn):
    import io
    import struct

    from pneumonia_batch.pipeline import decode_for_model

    padded = make_dataset(pixels)
    padded.PixelData += bytes(1000)
    array, note, why_not = decode_for_model(str(save(padded, tmp_path / "padded.dcm")), "dicom")
    plain, _ = model_input_from_file(save(make_dataset(pixels), tmp_path / "plain.dcm"), "dicom")
    np.testing.assert_array_equal(array, plain)
    assert (note, why_not) == ("decode: The pixel data is 205800 bytes long, which indicates it contains "
                               "1000 bytes of excess padding to be removed", "")
    # the decode worker notes them, not the decode itself: training decodes on tf.data's threads,
    # which must never swap the process-wide warning state
    with pytest.warns(UserWarning, match="excess padding"):
        model_input_from_file(tmp_path / "padded.dcm", "dicom")
    recwarn.clear()

    # an EXIF block whose description tag points past the end of the file
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010E, 2, 100000, 5000) + bytes(4)
    app1 = b"Exif\x00\x00" + tiff
    buffer = io.BytesIO()
    grey_to_image(grey_of(tmp_path / "plain.dcm")).save(buffer, "JPEG")
    data = buffer.getvalue()
    jpeg = tmp_path / "exif.jpeg"
    jpeg.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:])
    assert decode_for_model(str(jpeg), "jpeg")[1:] == ("decode: Tag data larger than file. Skipping tag 270", "")
    # an image refused for its size: the refusal, and not Pillow's warning as well
    assert decode_for_model(str(png_claiming(tmp_path / "over.png", 9500, 9500)), "png")[1:] == (
        "9500 x 9500 pixels; screening decodes at most 89,478,485 pixels", "image_too_large")
    assert len(recwarn) == 0
