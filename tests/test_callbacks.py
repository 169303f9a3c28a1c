"""The TensorBoard attention images come from the model's own public methods (no re-implemented forward)."""
import torch
from conftest import randomize_

from swinlab.models import create_model
from swinlab.training.callbacks import AttentionImages, head_grid


def test_attention_image_is_the_blocks_attention_probs_of_the_first_window():
    torch.manual_seed(0)
    model = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=3)).train()
    sample = torch.randn(1, 3, 32, 32)
    blk = model.layers[0].blocks[-1]  # the last (shifted) block of stage 0
    seen = []
    handle = blk.attn.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        images = dict(AttentionImages.images(model, sample, torch.device("cpu")))
    finally:
        handle.remove()
    assert model.training  # the mode is given back
    assert set(images) == {f"position_bias/stage{i}" for i in range(4)} | {"attention/stage0"}
    x, mask = seen[0]
    assert mask is not None  # a shifted block: the shift mask is part of what the image shows
    with torch.no_grad():
        probs = blk.attn.attention_probs(x[:1, :1], mask[:1])[0, 0]
        torch.testing.assert_close(images["attention/stage0"], head_grid(probs))
        torch.testing.assert_close(images["position_bias/stage1"],
                                   head_grid(model.layers[1].blocks[0].attn.position_bias()))
