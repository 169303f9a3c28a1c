"""SimMIM: exact mask ratio, loss on masked pixels only, decoder shape, encoder carried into fine-tuning."""
import math

import pytest
import torch
from conftest import randomize_

from swinlab.errors import ConfigError
from swinlab.tasks.simmim import MaskedImageModeling, MaskGenerator


@pytest.mark.parametrize("ratio", [0.6, 0.3, 0.75])
def test_mask_ratio_is_exact_per_image(ratio):
    gen = MaskGenerator((192, 192), mask_patch_size=32, model_patch_size=4, mask_ratio=ratio)
    mask = gen(16, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (16, 48, 48) and mask.dtype == torch.bool
    cells = mask[:, ::8, ::8]  # one entry per 32x32 mask patch
    assert (cells.flatten(1).sum(1) == math.ceil(36 * ratio)).all()
    # masking is constant inside each mask patch
    assert torch.equal(mask, cells.repeat_interleave(8, 1).repeat_interleave(8, 2))
    assert not torch.equal(mask[0], mask[1])  # random per image


def test_mask_settings_are_checked_against_the_model():
    with pytest.raises(ConfigError, match="not a multiple of the model's patch size 4"):
        MaskGenerator((192, 192), mask_patch_size=30, model_patch_size=4, mask_ratio=0.6)
    with pytest.raises(ConfigError, match="not divisible by mask_patch_size=32"):
        MaskGenerator((200, 200), mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    with pytest.raises(ConfigError, match="mask_ratio"):
        MaskedImageModeling("swinv2_pico_patch2_window4_32", mask_patch_size=8, mask_ratio=1.5)


@pytest.mark.parametrize("name", ["swinv2_pico_patch2_window4_32", "swin_pico_patch2_window4_32"])
def test_decoder_output_shape_and_loss_only_on_masked_pixels(name):
    task = MaskedImageModeling(name, mask_patch_size=8, mask_ratio=0.5)
    randomize_(task.encoder)
    x = torch.randn(3, 3, 32, 32)
    mask = task.mask_generator(3, generator=torch.Generator().manual_seed(1))
    loss, rec = task(x, mask)
    assert rec.shape == x.shape and task.encoder_stride == 16
    pm = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).unsqueeze(1).float()
    expected = ((rec - x).abs() * pm).sum() / pm.sum() / 3
    assert torch.allclose(loss, expected, atol=1e-5)
    # changing only visible pixels of the target leaves the loss unchanged; changing masked ones does not
    x_vis = x + 5.0 * (1 - pm)
    assert torch.allclose(MaskedImageModeling.masked_l1(x_vis, rec, pm, 3), loss, atol=1e-5)
    x_mask = x + 5.0 * pm
    assert MaskedImageModeling.masked_l1(x_mask, rec, pm, 3) > loss + 1.0


def test_mask_token_replaces_masked_tokens_only():
    task = MaskedImageModeling("swinv2_pico_patch2_window4_32", mask_patch_size=8, mask_ratio=0.5)
    randomize_(task.encoder)
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 16, 16, dtype=torch.bool)
    all_ = torch.ones(2, 16, 16, dtype=torch.bool)
    plain = task.encoder.norm(task.encoder.layers(task.encoder.patch_embed(x))).permute(0, 3, 1, 2)
    assert torch.allclose(task.encode(x, none), plain, atol=1e-6)
    # everything masked: the output no longer depends on the image
    assert torch.allclose(task.encode(x, all_), task.encode(torch.randn_like(x), all_), atol=1e-5)
