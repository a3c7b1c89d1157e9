"""Batched on-device augmentation: geometry against torchvision, randomness, determinism, datasets."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader
from torchvision import transforms as T

from inflora_avalanche.streams.common import DataUnavailableError
from inflora_avalanche.device_augment import DeviceAugment, boxes_to_theta, images_to_uint8_tensor, sample_crop_boxes
from inflora_avalanche.streams.cifar import cifar100_uint8
from inflora_avalanche.streams.common import BatchedTensorImageDataset, batched_collate


def _images(n: int = 6, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_output_shape_dtype_and_range():
    x = _images()
    aug = DeviceAugment(48, seed=0)
    for training in (True, False):
        out = aug(x, training)
        assert out.shape == (6, 3, 48, 48)
        assert out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert out.max() > 0.9  # uint8 was scaled to [0, 1], not left at 0..255 or squashed
    floats = aug(x.float() / 255.0, False)
    assert torch.allclose(floats, aug(x, False), atol=1e-6)


def test_full_image_box_without_flip_equals_torchvision_resize():
    x = _images()
    ref = T.Resize(64, antialias=False)(x.float() / 255.0)
    no_crop = DeviceAugment(64, flip=False, random_crop=False)
    assert torch.allclose(no_crop(x, False), ref, atol=1e-5)
    assert torch.allclose(no_crop(x, True), ref, atol=1e-5)  # the grid_sample path, full box, no flip


def test_eval_resize_matches_pil_within_rounding():
    # The reference resizes PIL images (uint8 output): the device path differs by uint8 rounding only.
    x = _images(2)
    out = DeviceAugment(64)(x, False)
    for k in range(2):
        pil = TF.to_tensor(T.Resize(64)(TF.to_pil_image(x[k])))
        assert (out[k] - pil).abs().max() < 2.5 / 255


def test_box_and_flip_match_torchvision_resized_crop_inside_border():
    x = _images(3)
    boxes = torch.tensor([[3, 5, 20, 17], [0, 0, 32, 32], [1, 2, 30, 24]])
    flip = torch.tensor([False, True, True])
    aug = DeviceAugment(96, flip=False, random_crop=False)
    out = aug._sample(x, boxes_to_theta(boxes, 32, 32, flip))
    for k in range(3):
        t, l, h, w = boxes[k].tolist()
        ref = TF.resized_crop(x[k].float() / 255.0, t, l, h, w, [96, 96], antialias=False)
        if flip[k]:
            ref = TF.hflip(ref)
        # within half a source pixel of the crop border the grid blends in the neighbouring pixel (documented)
        assert torch.allclose(out[k][:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)


def test_crop_boxes_follow_random_resized_crop_statistics():
    boxes = sample_crop_boxes(20000, 32, 40, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.long
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 40).all()
    area = (h * w).float() / (32 * 40)
    assert area.min() > 0.05 and area.max() <= 1.0
    ratio = w.float() / h.float()
    assert ratio.min() > 0.6 and ratio.max() < 1.7  # 3/4..4/3 up to integer rounding of small boxes
    # the mean box of torchvision's sampler on this size is ~ (h, w) = (22.5, 27.5); ours draws the same law
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 40), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(4000)]).float().mean(0)
    assert torch.allclose(boxes.float().mean(0), ref, atol=0.6)


def test_crop_fallback_is_centre_crop_with_clamped_ratio():
    # A 4 x 100 strip: no try fits a 3/4..4/3 box of >= 8% area, so every sample gets the centre fallback.
    boxes = sample_crop_boxes(50, 4, 100, generator=torch.Generator().manual_seed(1))
    expected = torch.tensor([0, (100 - 5) // 2, 4, 5])  # w = round(4 * 4/3) = 5
    assert (boxes == expected).all()


def test_crops_differ_per_sample_and_flip_happens():
    x = _images(1).expand(16, -1, -1, -1)  # the same image 16 times
    out = DeviceAugment(32, seed=3)(x, True)
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) == 16
    flipped_only = DeviceAugment(32, random_crop=False, seed=0)(x, True)
    same = torch.isclose(flipped_only, to := x.float() / 255.0, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(flipped_only, to.flip(-1), atol=1e-5).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_seeded_generator_is_deterministic_and_global_rng_untouched():
    x = _images(8)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = DeviceAugment(40, seed=7)(x, True)
    after = torch.rand(1)
    b = DeviceAugment(40, seed=7)(x, True)
    c = DeviceAugment(40, seed=8)(x, True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(before, after)  # the seeded path draws from its own generator
    aug = DeviceAugment(40, seed=7)
    first, second = aug(x, True), aug(x, True)
    assert not torch.equal(first, second)  # the generator advances between batches


def test_normalisation_and_non_square_eval():
    x = _images(2, 24, 40)
    aug = DeviceAugment(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = aug(x, False)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1.0 and out.max() <= 1.0
    plain = DeviceAugment(24, flip=False)(x, False)
    ref = T.CenterCrop(24)(x.float() / 255.0)  # Resize(24) is a no-op on the shorter side: centre square only
    assert torch.allclose(plain, ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"resolution": 0}, "resolution"), ({"mean": (0.5,)}, "mean and std"), ({"scale": (0.5, 0.1)}, "scale")],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeviceAugment(**kwargs)


def test_bad_input_shape_and_dtype():
    aug = DeviceAugment(16)
    with pytest.raises(ValueError, match="batch of images"):
        aug(torch.zeros(3, 8, 8, dtype=torch.uint8), True)
    with pytest.raises(TypeError, match="uint8 or floating"):
        aug(torch.zeros(1, 3, 8, 8, dtype=torch.int32), False)


def test_batched_dataset_loader_yields_uint8_batches():
    images = _images(10)
    ds = BatchedTensorImageDataset(images, list(range(10)))
    assert torch.equal(ds[3][0], images[3]) and ds[3][1] == 3
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=batched_collate)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and torch.equal(x, images[:4]) and y.tolist() == [0, 1, 2, 3]
    default = next(iter(DataLoader(ds, batch_size=4)))  # the default collate works on it too
    assert torch.equal(default[0], images[:4])


def test_cifar_helper_reports_missing_data(tmp_path):
    with pytest.raises(DataUnavailableError, match="cifar-100-python"):
        cifar100_uint8(tmp_path)


def test_images_to_uint8_tensor():
    from PIL import Image

    pils = [TF.to_pil_image(im) for im in _images(3, 8, 10)]
    out = images_to_uint8_tensor(pils)
    assert out.shape == (3, 3, 8, 10) and torch.equal(out, _images(3, 8, 10))
    with pytest.raises(ValueError, match="one size"):
        images_to_uint8_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
