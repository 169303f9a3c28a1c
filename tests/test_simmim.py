"""SimMIM: exact mask ratio, loss on masked pixels only, decoder shape, encoder carried into fine-tuning."""
import math

import pytest
import torch
from helpers import randomize_

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


def _cli(args, cwd):
    import os
    import subprocess
    import sys

    from helpers import ROOT
    # the checkout's swinlab, not an installed copy: the run happens in cwd (a tmp folder)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "swinlab", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def test_pretrain_then_finetune_chain_carries_the_encoder_exactly(tmp_path, monkeypatch):
    from helpers import ROOT

    from swinlab.models import read_checkpoint
    from swinlab.tasks import ImageClassifier

    exp = ROOT / "experiments"
    limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
              "--threads", "1", "--trainer.log_every_n_steps", "1"]
    pre = _cli(["fit", "--config", str(exp / "simmim_quick.yaml"), *limits], tmp_path)
    assert pre.returncode == 0, pre.stderr[-3000:]
    run = tmp_path / "runs" / "simmim_quick" / "version_0"
    exported = run / "best.safetensors"
    assert exported.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    # the TensorBoard run holds the input / masked input / reconstruction images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert {"simmim/input", "simmim/masked_input", "simmim/reconstruction"} <= set(events.Tags()["images"])
    assert "train/loss" in events.Tags()["scalars"] and "val/loss" in events.Tags()["scalars"]

    enc, meta = read_checkpoint(exported)
    assert meta["config"].num_classes == 0 and "head.fc.weight" not in enc
    ckpt, _ = read_checkpoint(run / "checkpoints" / "last.ckpt")  # 'encoder.' prefix stripped
    assert "mask_token" not in ckpt and all(torch.equal(enc[k], ckpt[k]) for k in enc)

    # fine-tune with window transfer 32/W4 -> 32/W8 and layer decay, through python -m swinlab's entry point
    # (in-process: the pretraining above is the real subprocess)
    from swinlab.__main__ import main as swinlab_main
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert swinlab_main(["fit", "--config", str(exp / "simmim_quick_finetune.yaml"), *limits]) == 0
    finally:
        torch.set_num_threads(threads)
    assert list((tmp_path / "runs" / "simmim_quick_finetune").glob("version_*/checkpoints/last.ckpt"))
    # the classifier the fine-tune config builds starts from exactly the pretrained encoder tensors
    clf = ImageClassifier(model_name="swinv2_pico_patch2_window4_32", num_classes=10, checkpoint=str(exported),
                          model_kwargs={"img_size": 32, "window_size": 8}, layer_decay=0.9)
    sd = clf.model.state_dict()
    assert clf.model.config.pretrained_window_size[0] == [4, 4]
    assert [b.window for b in clf.model.blocks()][0] == (8, 8)
    for k, v in enc.items():
        assert torch.equal(sd[k], v), k
    assert set(sd) - set(enc) == {"head.fc.weight", "head.fc.bias"}

    # the pretraining resumes where it stopped (mask token, decoder and optimizer state), in the same run folder
    before = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    try:
        assert swinlab_main(["fit", "--config", str(exp / "simmim_quick.yaml"), *limits[:1], "2", *limits[2:],
                             "--ckpt_path", "last"]) == 0
    finally:
        torch.set_num_threads(threads)
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (before["global_step"], after["global_step"]) == (3, 6)
    assert not torch.equal(before["state_dict"]["mask_token"], after["state_dict"]["mask_token"])
    steps = {int(v["step"]) for v in after["optimizer_states"][0]["state"].values()}
    assert steps == {6}  # Adam's state carried over: 3 steps before, 3 after
