"""aebnas/data/preprocess.py: the one input rule (scale, shift, resize) of training, TorchScript and ONNX."""

import numpy as np
import pytest
import torch

from aebnas.data.batches import BatchLoader
from aebnas.data.preprocess import Preprocess, resize

MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)


def test_uint8_and_float_inputs_are_normalised_with_mean_and_std():
    pre = Preprocess(MEAN, STD, 4)
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    # (x / 255 - mean) / std by hand: channel 0: (0 - 0.5) / 0.5, channel 1: (0.2 - 0.25) / 0.25, channel 2: 1 / 2
    expected = torch.tensor([-1.0, -0.2, 0.5]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(pre(x), expected)
    torch.testing.assert_close(pre(x.float() / 255), expected)


def test_resize_only_when_the_size_differs_unless_traced():
    x = torch.rand(2, 3, 8, 8)
    assert Preprocess(MEAN, STD, 6)(x).shape == (2, 3, 6, 6)
    same = Preprocess(MEAN, STD, 8)
    assert torch.equal(Preprocess(MEAN, STD, 8, always_resize=True)(x), same(x))  # bilinear at the same size
    assert resize(x, 8) is x


def test_bad_inputs_name_what_is_expected():
    pre = Preprocess(MEAN, STD, 8)
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        pre(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="float in"):
        pre(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be > 0"):
        Preprocess(MEAN, (1.0, 0.0, 1.0), 8)


def test_training_batches_use_the_same_rule():
    x = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    loader = BatchLoader(x, np.zeros(4, dtype=np.int64), batch_size=4, resolution=12, mean=MEAN, std=STD,
                         train=False)
    batch, _ = next(iter(loader))
    assert torch.equal(batch, Preprocess(MEAN, STD, 12)(torch.from_numpy(x)))
