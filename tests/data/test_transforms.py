import io

import numpy as np
import torch
from PIL import Image

from hfs.data.transforms import EvalTransform, TrainTransform, decode_image, to_tensor


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_to_tensor_range_and_layout():
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[..., 0] = 255
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.all(t[0] == 1.0) and torch.all(t[1] == -1.0)


def test_eval_transform_decodes_and_resizes():
    arr = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    t = EvalTransform(8)(_png(arr))
    assert t.shape == (3, 8, 8)
    same = EvalTransform(20)(_png(arr))
    assert torch.allclose(same, to_tensor(decode_image(_png(arr))))


def test_train_flip_is_seeded():
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    tf = TrainTransform(3, flip=True)
    a = [tf(Image.fromarray(arr).resize((3, 3)), np.random.default_rng(s)) for s in range(6)]
    b = [tf(Image.fromarray(arr).resize((3, 3)), np.random.default_rng(s)) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    base = EvalTransform(3)(Image.fromarray(arr).resize((3, 3)))
    for seed, out in enumerate(a):
        should_flip = np.random.default_rng(seed).random() < 0.5
        assert torch.equal(out, torch.flip(base, dims=[2]) if should_flip else base)
