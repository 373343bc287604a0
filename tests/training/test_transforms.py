"""Tests of the training transforms: PCA lighting, mean-image crops, random-interpolation resize."""
from __future__ import annotations

import math

import pytest
import torch

from adapters.preprocess import CenterCropWithMeanSub
from adapters.training.transforms import (
    INTERPOLATIONS,
    Lighting,
    RandomCropWithMeanSub,
    RandomResizeRandInterp,
)

# An orthonormal basis written out by hand: columns (1,1,1)/sqrt3, (1,-1,0)/sqrt2, (1,1,-2)/sqrt6.
S3, S2, S6 = math.sqrt(3), math.sqrt(2), math.sqrt(6)
EIGVECS = torch.tensor(
    [
        [1 / S3, 1 / S2, 1 / S6],
        [1 / S3, -1 / S2, 1 / S6],
        [1 / S3, 0.0, -2 / S6],
    ]
)
EIGVALS = torch.tensor([0.2, 0.02, 0.005])


# ----------------------------------------------------------------- Lighting


def test_lighting_adds_hand_computed_offset_along_eigenvectors():
    img = torch.rand(3, 5, 7)
    torch.manual_seed(0)
    out = Lighting(0.1, EIGVALS, EIGVECS)(img)
    assert out.shape == img.shape and out.dtype == img.dtype

    # torch.manual_seed(0); torch.randn(3) = [1.5410, -0.2934, -2.1788], times alphastd 0.1.
    a1, a2, a3 = 0.15409961342811584, -0.0293428897857666, -0.21787893772125244
    c1, c2, c3 = a1 * 0.2, a2 * 0.02, a3 * 0.005  # alpha_i * lambda_i
    expected = torch.tensor(
        [c1 / S3 + c2 / S2 + c3 / S6, c1 / S3 - c2 / S2 + c3 / S6, c1 / S3 - 2 * c3 / S6]
    )
    assert torch.allclose(expected, torch.tensor([0.0169342, 0.0177641, 0.0186834]), atol=1e-6)

    diff = out - img
    # The same RGB offset at every pixel ...
    assert torch.allclose(diff, expected[:, None, None].expand_as(diff), atol=1e-6)
    # ... whose coordinate along eigenvector i is alpha_i * lambda_i.
    coords = EIGVECS.T @ diff[:, 0, 0]
    assert torch.allclose(coords, torch.tensor([c1, c2, c3]), atol=1e-6)


def test_lighting_batch_draws_one_alpha_per_image_and_zero_std_is_identity():
    img = torch.zeros(2, 3, 4, 4)
    torch.manual_seed(1)
    out = Lighting(0.1, EIGVALS, EIGVECS)(img)
    torch.manual_seed(1)
    alpha = torch.randn(2, 3) * 0.1
    for b in range(2):
        offset = EIGVECS @ (alpha[b] * EIGVALS)
        assert torch.allclose(out[b], offset[:, None, None].expand(3, 4, 4), atol=1e-7)
    assert not torch.allclose(out[0], out[1])
    x = torch.rand(3, 4, 4)
    assert torch.equal(Lighting(0.0, EIGVALS, EIGVECS)(x), x)


def test_lighting_rejects_bad_input():
    with pytest.raises(ValueError, match="3 eigenvalues"):
        Lighting(0.1, [1.0, 2.0], EIGVECS)
    with pytest.raises(TypeError, match="float"):
        Lighting(0.1, EIGVALS, EIGVECS)(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="RGB"):
        Lighting(0.1, EIGVALS, EIGVECS)(torch.zeros(1, 2, 2))


# ----------------------------------------------------------------- mean-image crops


def _mean_and_image() -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6) / 100.0
    img = torch.full((3, 4, 6), 2.0)
    img[1] += 1.0
    return mean, img


def test_center_crop_with_mean_sub_equals_hand_computation():
    mean, img = _mean_and_image()
    out = CenterCropWithMeanSub(mean, 2)(img)
    # Centre of a 4x6 image for a 2x2 crop: top = (4-2)/2 = 1, left = (6-2)/2 = 2.
    # mean[c, y, x] = (24c + 6y + x) / 100, so the window holds 24c + {8, 9, 14, 15}.
    expected = torch.tensor(
        [
            [[2 - 0.08, 2 - 0.09], [2 - 0.14, 2 - 0.15]],
            [[3 - 0.32, 3 - 0.33], [3 - 0.38, 3 - 0.39]],
            [[2 - 0.56, 2 - 0.57], [2 - 0.62, 2 - 0.63]],
        ]
    )
    assert torch.allclose(out, expected, atol=1e-6)


def test_random_crop_with_mean_sub_is_a_window_of_the_difference():
    mean, img = _mean_and_image()
    crop = RandomCropWithMeanSub(mean, 3)
    full = img - mean
    windows = {(t, l): full[:, t : t + 3, l : l + 3] for t in range(2) for l in range(4)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        out = crop(img)
        assert out.shape == (3, 3, 3)
        match = [k for k, w in windows.items() if torch.allclose(out, w)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == set(windows)  # every one of the 2x4 offsets occurs
    # Seeded: the same draws give the same crop.
    torch.manual_seed(5)
    a = crop(img)
    torch.manual_seed(5)
    assert torch.equal(a, crop(img))


def test_mean_image_crop_requires_matching_size():
    mean, _ = _mean_and_image()
    with pytest.raises(ValueError, match="differs from the mean image"):
        CenterCropWithMeanSub(mean, 2)(torch.zeros(3, 5, 6))
    with pytest.raises(ValueError, match="does not fit"):
        CenterCropWithMeanSub(mean, 5)


# ----------------------------------------------------------------- random-interpolation resize


def test_random_resize_output_size_seeded():
    t = RandomResizeRandInterp(256, 480)
    img = torch.randint(0, 256, (3, 160, 200), dtype=torch.uint8)
    torch.manual_seed(0)
    out = t(img)
    # Seed 0 draws a shorter side of 300 (and bicubic): 160x200 -> 300 x round(200 * 300 / 160) = 300x375.
    assert out.shape == (3, 300, 375)
    assert out.dtype == torch.uint8
    # Portrait input: the width is the shorter side.
    portrait = torch.rand(3, 200, 160)
    torch.manual_seed(0)
    assert t(portrait).shape == (3, 375, 300)


def test_random_resize_range_and_every_interpolation():
    img = torch.rand(3, 160, 160)
    sizes = set()
    for mode in INTERPOLATIONS:
        t = RandomResizeRandInterp(64, 70, interpolations=(mode,))
        for _ in range(8):
            out = t(img)
            assert out.shape[0] == 3 and out.shape[1] == out.shape[2]
            assert 64 <= out.shape[1] <= 70
            sizes.add(out.shape[1])
    assert len(sizes) > 3
    # A fixed size: a constant image stays constant under every interpolation.
    const = torch.full((3, 10, 20), 0.25)
    for mode in INTERPOLATIONS:
        out = RandomResizeRandInterp(5, 5, interpolations=(mode,))(const)
        assert out.shape == (3, 5, 10)
        assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-6)


def test_random_resize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_size"):
        RandomResizeRandInterp(300, 200)
    with pytest.raises(ValueError, match="unknown interpolation"):
        RandomResizeRandInterp(10, 20, interpolations=("lanczos",))
