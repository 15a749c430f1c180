import pytest
import torch

from hfs.config import load_config
from hfs.data.convert import rec_to_images
from hfs.data.datasets import ImageListDataset, build_datasets
from hfs.data.synthetic import write_synthetic_rec
from hfs.utils.errors import HfsError


@pytest.fixture(scope="module")
def rec_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    write_synthetic_rec(folder, num_classes=4, images_per_class=5, image_size=20, seed=0)
    return folder


def _cfg(**data):
    return load_config(None, [f"data.{k}={v}" for k, v in data.items()])


def test_synthetic_source():
    train, val, n = build_datasets(_cfg(synthetic_classes=5, synthetic_images_per_class=3, image_size=24,
                                        synthetic_val_per_class=1))
    assert n == 5 and len(train) == 15 and len(val) == 5
    x, y = train[4]
    assert x.shape == (3, 24, 24) and y == 1
    _, val, _ = build_datasets(_cfg(synthetic_classes=5, synthetic_val_per_class=0))
    assert val is None


def test_rec_source_with_two_workers_matches_single_process(rec_folder):
    train, val, n = build_datasets(_cfg(source="rec", root=rec_folder, image_size=20, rec_val_ratio=0.2,
                                        hflip=False))
    assert n == 4 and len(train) == 16 and len(val) == 4
    loader = torch.utils.data.DataLoader(train, batch_size=5, num_workers=2, shuffle=False)
    xs, ys = zip(*loader)
    xs, ys = torch.cat(xs), torch.cat(ys)
    assert ys.tolist() == train.labels().tolist()
    for i in (0, 7, 15):
        assert torch.equal(xs[i], train[i][0])
    assert sorted(set(val.labels().tolist())) == [0, 1, 2, 3]


def test_list_source_matches_rec_source(rec_folder, tmp_path):
    rec_to_images(rec_folder, tmp_path, val_ratio=0.2, seed=0)
    lst_train, lst_val, n = build_datasets(_cfg(source="list", root=tmp_path, image_size=20))
    rec_train, rec_val, _ = build_datasets(_cfg(source="rec", root=rec_folder, image_size=20, rec_val_ratio=0.2))
    assert n == 4 and len(lst_train) == len(rec_train) and len(lst_val) == len(rec_val)
    # same split rule, same images, same tensors
    assert torch.equal(lst_val[2][0], rec_val[2][0]) and lst_val[2][1] == rec_val[2][1]
    assert torch.equal(lst_train[3][0], rec_train[3][0])


def test_training_augmentation_is_seeded_and_varies_by_epoch(rec_folder):
    train, _, _ = build_datasets(_cfg(source="rec", root=rec_folder, image_size=20))
    plain, _, _ = build_datasets(_cfg(source="rec", root=rec_folder, image_size=20, hflip=False))
    base = plain[0][0]
    flipped = []
    for epoch in range(10):
        train.set_epoch(epoch)
        x = train[0][0]
        assert torch.equal(x, train[0][0])  # same (index, epoch): same augmentation
        assert torch.equal(x, base) or torch.equal(x, base.flip(-1))
        flipped.append(not torch.equal(x, base))
    assert any(flipped) and not all(flipped)


def test_list_errors_name_file_and_line(tmp_path):
    (tmp_path / "train_list.txt").write_text("images/0/1.jpg 0\nimages/0/2.jpg zero\n")
    with pytest.raises(HfsError, match=r"train_list.txt line 2: expected 'relative/path label'"):
        ImageListDataset(tmp_path / "train_list.txt", tmp_path, 20)
    (tmp_path / "train_list.txt").write_text("images/0/1.jpg 0\n")
    ds = ImageListDataset(tmp_path / "train_list.txt", tmp_path, 20)
    with pytest.raises(HfsError, match=r"image not found: .*images/0/1.jpg \(listed in .*train_list.txt\)"):
        ds[0]
    (tmp_path / "images/0").mkdir(parents=True)
    (tmp_path / "images/0/1.jpg").write_bytes(b"not an image")
    with pytest.raises(HfsError, match=r"cannot decode .*1.jpg"):
        ds[0]


def test_missing_root_and_index_are_named(tmp_path):
    with pytest.raises(HfsError, match="data.root must be set"):
        build_datasets(_cfg(source="rec"))
    with pytest.raises(HfsError, match="index not found: .*train.idx"):
        build_datasets(_cfg(source="rec", root=tmp_path))
    (tmp_path / "train_list.txt").write_text("a.jpg 5\n")
    (tmp_path / "val_list.txt").write_text("")
    (tmp_path / "property").write_text("3,20,20")
    with pytest.raises(HfsError, match="label 5 but .*property says 3 classes"):
        build_datasets(_cfg(source="list", root=tmp_path))
