import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from hfs.data.bins import bin_name, load_bin, write_bin
from hfs.utils.errors import HfsError


def _png(seed: int, size: int = 6) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [_png(i) for i in range(6)]
ISSAME = [True, False, True]


def _short_or_long_binstring(data: bytes) -> bytes:
    """Python 2 `str` opcodes: SHORT_BINSTRING for < 256 bytes, else BINSTRING."""
    if len(data) < 256:
        return b"U" + bytes([len(data)]) + data
    return b"T" + struct.pack("<I", len(data)) + data


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Hand-written protocol-2 pickle as Python 2 writes it: images are `str` (BINSTRING) objects."""
    out = [b"\x80\x02", b"]", b"("]
    out += [_short_or_long_binstring(img) for img in images]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def _py2_numpy_uint8(data: bytes) -> bytes:
    """Python 2 NumPy pickle of a 1-D uint8 array (dtype strings and raw data are `str`)."""
    return b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n",
        b"K\x00\x85", _short_or_long_binstring(b"b"), b"\x87R",          # _reconstruct(ndarray, (0,), 'b')
        b"(K\x01", b"K" + bytes([len(data)]) + b"\x85",                   # state: (1, (n,),
        b"cnumpy\ndtype\n", _short_or_long_binstring(b"u1"), b"K\x00K\x01\x87R",  # dtype('u1', 0, 1)
        b"(K\x03", _short_or_long_binstring(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        b"\x89", _short_or_long_binstring(data), b"tb",                  # False, rawdata)
    ])


def test_python2_str_pickle_loads_byte_exact(tmp_path):
    big = _png(99, size=40)  # > 255 bytes: exercises BINSTRING as well as SHORT_BINSTRING
    images = IMAGES[:5] + [big]
    assert any(len(i) < 256 for i in images) and len(big) >= 256
    raw = _py2_pickle(images, ISSAME)
    with pytest.raises(UnicodeDecodeError):  # the quirk: default Python 3 loading fails on these
        pickle.loads(raw)
    path = tmp_path / "py2.bin"
    path.write_bytes(raw)
    got, issame = load_bin(path)
    assert got == images
    assert issame.dtype == bool and issame.tolist() == ISSAME


def test_python2_numpy_array_images_load(tmp_path):
    small = [_png(i, size=2) for i in range(2)]
    assert all(len(s) < 256 for s in small)
    body = b"\x80\x02](" + b"".join(_py2_numpy_uint8(s) for s in small) + b"e](\x88e\x86."
    path = tmp_path / "py2np.bin"
    path.write_bytes(body)
    got, issame = load_bin(path)
    assert got == small and issame.tolist() == [True]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_python3_bytes_pickle_loads(tmp_path, protocol):
    path = tmp_path / "py3.bin"
    path.write_bytes(pickle.dumps((IMAGES, np.array(ISSAME)), protocol=protocol))
    got, issame = load_bin(path)
    assert got == IMAGES and issame.tolist() == ISSAME


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_encoded_buffers_load_as_the_same_bytes(tmp_path, protocol):
    arrays = [np.frombuffer(img, dtype=np.uint8) for img in IMAGES]
    issame = [np.bool_(s) for s in ISSAME]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((arrays, issame), protocol=protocol))
    got, same = load_bin(path)
    assert got == IMAGES and same.tolist() == ISSAME


def test_numpy_decoded_images_come_back_as_lossless_png(tmp_path):
    rng = np.random.default_rng(1)
    hwc = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(2)]
    chw = rng.integers(0, 256, (3, 5, 7), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    path = tmp_path / "decoded.bin"
    path.write_bytes(pickle.dumps(([hwc[0], hwc[1], chw, grey], [False, True]), protocol=4))
    got, _ = load_bin(path)
    decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in got]
    assert all(b.startswith(b"\x89PNG") for b in got)
    np.testing.assert_array_equal(decoded[0], hwc[0])
    np.testing.assert_array_equal(decoded[1], hwc[1])
    np.testing.assert_array_equal(decoded[2], chw.transpose(1, 2, 0))
    np.testing.assert_array_equal(decoded[3], grey)


def test_one_block_of_decoded_images_loads(tmp_path):
    block = np.random.default_rng(2).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    path = tmp_path / "block.bin"
    path.write_bytes(pickle.dumps((block, np.array([True, False])), protocol=4))
    got, issame = load_bin(path)
    assert len(got) == 4 and issame.tolist() == [True, False]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(got[3]))), block[3])


def test_write_then_load_round_trips_and_is_plain(tmp_path):
    path = tmp_path / "out" / "lfw.bin"
    write_bin(path, IMAGES, np.array(ISSAME))
    got, issame = load_bin(path)
    assert got == IMAGES and issame.tolist() == ISSAME
    # InsightFace's own loader: pickle.load(f, encoding='bytes') on (bins, issame_list)
    bins, issame_list = pickle.loads(path.read_bytes(), encoding="bytes")
    assert bins == IMAGES and issame_list == ISSAME
    assert bin_name(path) == "lfw"
    assert [p.name for p in path.parent.iterdir()] == ["lfw.bin"]


def test_write_refuses_bad_counts_and_keeps_old_file(tmp_path):
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="5 images for 3 pairs"):
        write_bin(path, IMAGES[:5], ISSAME)
    with pytest.raises(TypeError, match="image 0"):
        write_bin(path, [np.zeros(3, np.uint8)] * 6, ISSAME)
    assert path.read_bytes() == before


def test_image_count_not_twice_pairs_is_refused(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps((IMAGES[:5], ISSAME)))
    with pytest.raises(HfsError) as err:
        load_bin(path)
    msg = str(err.value)
    assert str(path) in msg and "5 images" in msg and "3 pairs" in msg and "\n" not in msg


@pytest.mark.parametrize("payload, fragment", [
    (lambda: pickle.dumps((IMAGES, ISSAME))[:-40], "truncated"),
    (lambda: b"\x00\x01garbage", "not a readable verification .bin"),
    (lambda: b"", "truncated"),
    (lambda: pickle.dumps({"a": 1}), "not a verification pair file"),
    (lambda: pickle.dumps((IMAGES, [[1, 2], [3, 4], [5, 6]])), "issame"),
    (lambda: pickle.dumps(([1, 2], [True])), "image 0 is a int"),
])
def test_corrupt_or_foreign_files_are_one_line_errors(tmp_path, payload, fragment):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload())
    with pytest.raises(HfsError) as err:
        load_bin(path)
    msg = str(err.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(), b"x"], [True])))
    with pytest.raises(HfsError, match="refusing to load global"):
        load_bin(path)
    codecs_trick = tmp_path / "codecs.bin"
    # _codecs.encode is allowed only as the latin1 bytes reconstructor, not as a general codec call
    codecs_trick.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(HfsError, match="only allowed for latin1"):
        load_bin(codecs_trick)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(HfsError, match="cannot read verification file .*nope.bin"):
        load_bin(tmp_path / "nope.bin")
