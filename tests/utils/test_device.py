import pytest
import torch

from hfs.utils.device import resolve_device
from hfs.utils.errors import HfsError


def test_device_names_are_checked_and_errors_name_the_source():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None).type == resolve_device("auto").type
    with pytest.raises(HfsError, match="config key 'train.device': unknown device 'gpu0'"):
        resolve_device("gpu0", "config key 'train.device'")
    if not torch.cuda.is_available():
        with pytest.raises(HfsError, match="--device is 'cuda' but CUDA is not available"):
            resolve_device("cuda", "--device")
