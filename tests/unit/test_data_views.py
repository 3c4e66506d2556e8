"""The questions a mix dataset answers, asked at the top of a stack of views."""

import numpy as np
import pytest
import torch

from metaseg.data.binary import BinaryClassView
from metaseg.data.mix import Normalized
from metaseg.data.splits import SplitPart
from metaseg.data.synthetic import SyntheticDomain
from metaseg.data.view import IndexView, SegmentationDataset, count_pixels


class Patches(SegmentationDataset):
    """Four 6 x 6 images of value i whose mask is 2 on the left half; it serves patches, counts known."""

    num_classes = 3
    serves_patches = True
    pixel_counts = np.array([[18, 0, 18, 0]] * 4)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        mask = torch.zeros(6, 6, dtype=torch.long)
        mask[:, :3] = 2
        return torch.full((3, 6, 6), float(index)), mask

    def full_resolution(self, index):
        image, mask = self[index]
        return image.repeat(1, 2, 2), mask.repeat(2, 2)

    def support_patches(self, indices, per_image, generator):
        images, masks = zip(*(self[int(i)] for i in indices for _ in range(per_image)))
        return torch.stack(images)[..., :2, :2], torch.stack(masks)[..., :2, :2]


def test_a_leaf_answers_with_its_defaults():
    ds = SyntheticDomain(1, 3, 16)
    assert not ds.serves_patches and ds.normalisation is None
    assert all(torch.equal(a, b) for a, b in zip(ds.full_resolution(2), ds[2]))
    assert all(torch.equal(a, b) for a, b in zip(ds.plain_sample(2), ds[2]))
    np.testing.assert_array_equal(ds.pixel_counts, count_pixels(ds, 4))
    assert ds.pixel_counts.sum() == 3 * 16 * 16 and ds.info() == {"images": 3}
    with pytest.raises(TypeError, match="no support patches"):
        ds.support_patches([0], 2, torch.Generator())


def test_views_pass_every_question_down_in_their_own_numbering():
    top = BinaryClassView(SplitPart(Normalized(Patches(), [1.0] * 3, [2.0] * 3), [3, 1, 2]), 2, [2, 0])
    assert len(top) == 2 and top.serves_patches
    mean, std = top.normalisation
    assert mean.flatten().tolist() == [1.0] * 3 and std.flatten().tolist() == [2.0] * 3
    image, mask = top.full_resolution(0)  # image 2 of the split part: image 2 of the leaf, normalised
    assert image.shape == (3, 12, 12) and float(image[0, 0, 0]) == (2 - 1) / 2
    assert mask.unique().tolist() == [0, 1]  # class 2 -> 1, the rest -> 0
    np.testing.assert_array_equal(top.pixel_counts, [[18, 18, 0]] * 2)  # background, foreground, ignore
    assert top.info() == {"images": 2}
    part = IndexView(Normalized(Patches(), [0.0] * 3, [1.0] * 3), [3, 0])
    images, masks = part.support_patches([0], 2, torch.Generator())
    assert images.shape == (2, 3, 2, 2) and float(images.max()) == 3.0


def test_binary_views_adapt_on_their_support_images_not_on_patches():
    top = BinaryClassView(Normalized(Patches(), [0.0] * 3, [1.0] * 3), 2, [1, 3])
    images, masks = top.support_patches([1], 5, torch.Generator())
    assert images.shape == (1, 3, 6, 6) and float(images.max()) == 3.0 and masks.max() == 1


def test_the_validation_side_of_a_split_serves_plain_samples():
    class Drawn(SegmentationDataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.full((3, 2, 2), 9.0), torch.zeros(2, 2, dtype=torch.long)

        def plain_sample(self, index):
            return torch.full((3, 2, 2), float(index)), torch.zeros(2, 2, dtype=torch.long)

    base = Normalized(Drawn(), [0.0] * 3, [1.0] * 3)
    assert float(SplitPart(base, [2, 1], plain=True)[0][0].max()) == 2.0
    assert float(SplitPart(base, [2, 1])[0][0].max()) == 9.0
