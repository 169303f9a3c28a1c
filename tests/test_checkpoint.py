"""Checkpoints: official / timm / Lightning / swinlab formats, window-size transfer, safe loading, convert CLI."""
import json
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import randomize_
from test_models import timm_twin
from timm.models import swin_transformer as timm_v1
from timm.models import swin_transformer_v2 as timm_v2

from swinlab.errors import CheckpointError
from swinlab.models import SwinConfig, create_model, read_checkpoint, save_safetensors


def to_official(state_dict, model):
    """timm layout -> microsoft/Swin-Transformer layout, wrapped in {'model': ...}, with the persistent buffers the
    official code saves placed as it saves them: right after their module's first parameter (the index after the bias
    table, the block's mask after its first norm), not at the end."""
    buffers = {}  # module -> its buffers
    for name, buf in model.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask", "relative_coords_table")):
            buffers.setdefault(name.rsplit(".", 1)[0] + ".", []).append((name, buf.clone()))
    out = {}
    for k, v in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[key.replace("head.fc.", "head.")] = v
        for module in [m for m in buffers if k.startswith(m)]:
            out.update(buffers.pop(module))
    for rest in buffers.values():
        out.update(rest)
    return {"model": out, "epoch": 299, "config": "swin_tiny.yaml"}


@pytest.mark.parametrize("name,module", [("swin_tiny_patch4_window7_224", timm_v1),
                                         ("swinv2_pico_patch2_window4_32", timm_v2)])
def test_official_checkpoint_equals_timms_own_conversion(tmp_path, name, module):
    src = randomize_(timm_twin(name))
    path = tmp_path / "official.pth"
    official = to_official(src.state_dict(), src)
    assert "layers.0.downsample.reduction.weight" in official["model"] and "head.weight" in official["model"]
    torch.save(official, path)
    ref = timm_twin(name)
    ref.load_state_dict(module.checkpoint_filter_fn(torch.load(path, weights_only=True), ref))
    ours = create_model(name, checkpoint=str(path))
    x = torch.randn(2, 3, *ours.img_size)
    with torch.no_grad():
        err = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert err <= 1e-5


def test_v2_transfer_256w8_to_384w12_equals_timm_with_pretrained_window_8(tmp_path):
    src = randomize_(timm.create_model("swinv2_tiny_window8_256"))
    path = tmp_path / "v2t.pth"
    torch.save(src.state_dict(), path)
    ours = create_model("swinv2_tiny_window8_256", checkpoint=str(path), img_size=384, window_size=12)
    assert ours.config.pretrained_window_size == [[8, 8]] * 4
    assert [b.window for b in ours.blocks()][::2] == [(12, 12)] * 6
    ref = timm.create_model("swinv2_tiny_window8_256", img_size=384, window_size=12, pretrained_window_sizes=(8,) * 4)
    ref.load_state_dict(src.state_dict())
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        err = (ours.eval()(x) - ref.eval()(x)).abs().max().item()
    assert err <= 1e-5
    # and the transfer really changed the bias: the same weights without pretrained windows differ
    plain = create_model("swinv2_tiny_window8_256", checkpoint=str(path), img_size=384, window_size=12,
                         pretrained_window_size=0)
    with torch.no_grad():
        assert (plain.eval()(x) - ref(x)).abs().max() > 1e-3


def test_v2_transfer_from_a_small_size_uses_the_clamped_source_windows(tmp_path):
    # like 192/W12 -> 256/W16 with PRETRAINED_WINDOW_SIZES [12, 12, 12, 6]: the last stages were clamped at the source
    src = randomize_(create_model("swinv2_pico_patch2_window4_32", img_size=16))
    assert [b.window for b in src.blocks()][::2] == [(4, 4), (4, 4), (2, 2), (1, 1)]
    path = save_safetensors(src, tmp_path / "small.safetensors", "swinv2_pico_patch2_window4_32")
    big = create_model("swinv2_pico_patch2_window4_32", checkpoint=str(path), img_size=64, window_size=8)
    assert big.config.pretrained_window_size == [[4, 4], [4, 4], [2, 2], [1, 1]]
    assert torch.equal(big.layers[2].blocks[0].attn.cpb_mlp[0].weight, src.layers[2].blocks[0].attn.cpb_mlp[0].weight)


def test_v1_transfer_is_the_official_bicubic_formula(tmp_path):
    src = randomize_(create_model("swin_pico_patch2_window4_32"))
    path = save_safetensors(src, tmp_path / "v1.safetensors", "swin_pico_patch2_window4_32")
    big = create_model("swin_pico_patch2_window4_32", checkpoint=str(path), img_size=64, window_size=8)
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    old = src.state_dict()[key]  # (7*7, heads)
    heads = old.shape[1]
    expected = F.interpolate(old.permute(1, 0).view(1, heads, 7, 7), size=(15, 15), mode="bicubic")
    expected = expected.view(heads, 15 * 15).permute(1, 0)
    assert torch.allclose(big.state_dict()[key], expected, atol=1e-6)
    # every other weight is carried over unchanged
    for k, v in src.state_dict().items():
        if "relative_position_bias_table" not in k:
            assert torch.equal(big.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.isfinite(big.eval()(torch.randn(1, 3, 64, 64))).all()


def test_v1_transfer_of_a_non_square_window_resizes_each_axis(tmp_path):
    """Window (2, 4) -> (4, 8) at 32 px: stage 0's (3 x 7) table becomes (7 x 15) by the official bicubic formula,
    written out here per axis; stage 3 (a 2 x 2 grid, its window clamped in both models) is carried over as is."""
    name = "swin_pico_patch2_window4_32"
    src = randomize_(create_model(name, window_size=(2, 4)))
    path = save_safetensors(src, tmp_path / "v1.safetensors", name)
    wide = create_model(name, checkpoint=str(path), window_size=(4, 8))
    assert_stage0_resized_stage3_kept(src, wide, (3, 7), (7, 15))


def assert_stage0_resized_stage3_kept(src, moved, old_side, new_side):
    """Stage 0's (2Wh-1) x (2Ww-1) table, resized per axis by the official bicubic formula written out here; stage
    3's table carried over as is."""
    key = "layers.0.blocks.1.attn.relative_position_bias_table"
    old = src.state_dict()[key]
    heads = old.shape[1]
    expected = F.interpolate(old.permute(1, 0).reshape(1, heads, *old_side), size=new_side, mode="bicubic")
    torch.testing.assert_close(moved.state_dict()[key],
                               expected.reshape(heads, new_side[0] * new_side[1]).permute(1, 0))
    last = "layers.3.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(moved.state_dict()[last], src.state_dict()[last])


def test_swinlab_and_lightning_checkpoints_round_trip(tmp_path):
    src = randomize_(create_model("swinv2_pico_patch2_window4_32", num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(x)
    st = save_safetensors(src, tmp_path / "w.safetensors", "swinv2_pico_patch2_window4_32")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}, "global_step": 3,
                "swinlab": {"model": "swinv2_pico_patch2_window4_32", "config": src.config.to_dict()}}, ckpt)
    for path in (st, ckpt):
        sd, meta = read_checkpoint(path)
        assert meta["config"].num_classes == 7
        loaded = create_model("swinv2_pico_patch2_window4_32", checkpoint=str(path)).eval()
        assert loaded.num_classes == 7
        with torch.no_grad():
            assert torch.allclose(loaded(x), want, atol=1e-6)


# the metadata swinlab wrote before SwinConfig existed (the model.config dict, json.dumps'ed), for a V2 pico moved to
# 64 px / window 8 with 7 classes: files written then must load with the same geometry
OLD_METADATA = (
    '{"img_size": [64, 64], "patch_size": 2, "in_chans": 3, "num_classes": 7, "embed_dim": 16, "depths": [2, 2, 2, 2], '
    '"num_heads": [1, 2, 4, 8], "window_size": [[8, 8], [8, 8], [8, 8], [8, 8]], "mlp_ratio": 4.0, "version": "v2", '
    '"norm_placement": "res_post", "attention": "cosine", "position_bias": "cpb_log", "qkv_bias": "qv", '
    '"merge_order": "reduce_norm", "extra_norm_period": 0, "pretrained_window_size": [[4, 4], [4, 4], [2, 2], [1, 1]], '
    '"drop_rate": 0.0, "proj_drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0, "fused_attn": false, '
    '"attn_chunk_size": 0, "grad_checkpointing": true}')


def test_metadata_written_before_swinconfig_still_loads(tmp_path):
    from safetensors.torch import save_file
    name = "swinv2_pico_patch2_window4_32"
    src = randomize_(create_model(name, img_size=64, window_size=8, num_classes=7,
                                  pretrained_window_size=[[4, 4], [4, 4], [2, 2], [1, 1]])).eval()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path),
              metadata={"format": "pt", "swinlab_model": name, "swinlab_config": OLD_METADATA})
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()},
                "swinlab": {"model": name, "config": json.loads(OLD_METADATA)}}, ckpt)
    x = torch.randn(1, 3, 64, 64)
    for file in (path, ckpt):
        _, meta = read_checkpoint(file)
        assert meta["model"] == name and meta["config"] == SwinConfig.from_dict(json.loads(OLD_METADATA))
        loaded = create_model(name, checkpoint=str(file)).eval()
        # the saved geometry, the caller's runtime switches (fused_attn / grad_checkpointing are not the file's)
        assert loaded.config == src.config
        with torch.no_grad():
            assert torch.equal(loaded(x), src(x))
    # and what swinlab writes now is that same dict
    new = save_safetensors(src, tmp_path / "new.safetensors", name)
    from safetensors import safe_open
    with safe_open(str(new), framework="pt") as f:
        assert json.loads(f.metadata()["swinlab_config"]) == {**json.loads(OLD_METADATA), "fused_attn": True,
                                                              "grad_checkpointing": False, "global_pool": "avg"}


def test_metadata_that_is_not_a_model_config_is_one_line(tmp_path):
    ckpt = tmp_path / "odd.ckpt"
    torch.save({"state_dict": create_model("v1_pico").state_dict(),
                "swinlab": {"model": "swin_pico_patch2_window4_32", "config": {"img_size": 32, "colour": "red"}}}, ckpt)
    with pytest.raises(CheckpointError, match=r"^\S*odd\.ckpt has swinlab metadata that is not a model config .*colour"
                       ) as e:
        create_model("v1_pico", checkpoint=str(ckpt))
    assert "\n" not in str(e.value)


def test_a_file_without_swin_weights_is_named_and_deepspeeds_module_wrapper_is_opened(tmp_path):
    """Errors name the file and what it holds; the weights are found under Lightning's ``state_dict``, the official
    ``model`` and DeepSpeed's ``module`` (its mp_rank_00_model_states.pt), with any module prefix dropped."""
    from swinlab.models.checkpoint import read_checkpoint
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"^\S*list\.pth holds a list, not a state dict: save model\.state_dict"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"weight": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"^no Swin weights in \S*other\.pth \(no key ending in "
                                              r"'patch_embed\.proj\.weight'\): is this a Swin checkpoint\?$"):
        read_checkpoint(tmp_path / "other.pth")
    sd = randomize_(create_model("v1_pico")).state_dict()
    for wrapper in ("state_dict", "model", "module"):
        torch.save({wrapper: {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}}, tmp_path / "w.pt")
        loaded, _ = read_checkpoint(tmp_path / "w.pt")
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items()), wrapper


def test_fine_tune_head_is_reinitialised_when_num_classes_changes(tmp_path):
    src = randomize_(create_model("swin_pico_patch2_window4_32", num_classes=10))
    path = save_safetensors(src, tmp_path / "w.safetensors")
    with pytest.warns(UserWarning, match="head re-initialised"):
        model = create_model("swin_pico_patch2_window4_32", checkpoint=str(path), num_classes=3)
    assert model.head.fc.out_features == 3
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_wrong_variant_checkpoint_names_keys_and_the_variant_that_fits(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("swin_small_patch4_window7_224").state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        create_model("swin_tiny_patch4_window7_224", checkpoint=str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert "unexpected layers.2.blocks.6" in msg
    assert "swin_small_patch4_window7_224" in msg
    torch.save(create_model("swin_pico_patch2_window4_32").state_dict(), tmp_path / "v1.pth")  # V1 into a V2 model
    with pytest.raises(CheckpointError) as e:
        create_model("swinv2_pico_patch2_window4_32", checkpoint=str(tmp_path / "v1.pth"))
    assert "\n" not in str(e.value) and "does not fit" in str(e.value) and "swin_pico_patch2_window4_32" in str(e.value)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = create_model("swin_pico_patch2_window4_32").state_dict()
    torch.save({"model": sd, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load .*tensors only"):
        create_model("swin_pico_patch2_window4_32", checkpoint=str(path))
    assert not marker.exists()


def test_truncated_and_missing_files_get_one_line(tmp_path):
    good = save_safetensors(create_model("v1_pico"), tmp_path / "w.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.safetensors as safetensors \(Error while "
                                              r"deserializing header: .*\): the file is truncated"):
        create_model("v1_pico", checkpoint=str(cut))  # the safetensors library's own first line, quoted
    torch.save(create_model("v1_pico").state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        create_model("v1_pico", checkpoint=str(tmp_path / "cut.pth"))
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("v1_pico", checkpoint=str(tmp_path / "nope.pth"))


def test_convert_cli_writes_a_transferred_safetensors(tmp_path, capsys):
    """``python -m swinlab convert`` through its entry point, in-process (tests/test_export.py starts the command as a
    real subprocess)."""
    from swinlab.__main__ import main as swinlab_main
    src = randomize_(timm_twin("swin_pico_patch2_window4_32"))
    official = tmp_path / "official.pth"
    torch.save(to_official(src.state_dict(), src), official)
    out = tmp_path / "big.safetensors"
    capsys.readouterr()
    rc = swinlab_main(["convert", str(official), "--model", "swin_pico_patch2_window4_32", "--img-size", "64",
                       "--window-size", "8", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    info = json.loads(captured.out.strip().splitlines()[-1])
    assert info["img_size"] == [64, 64] and info["window_size"][0] == 8
    direct = create_model("swin_pico_patch2_window4_32", checkpoint=str(official), img_size=64, window_size=8).eval()
    reloaded = create_model("swin_pico_patch2_window4_32", checkpoint=str(out)).eval()  # geometry from metadata
    assert reloaded.config.img_size == [64, 64]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(direct(x), reloaded(x))
    rc = swinlab_main(["convert", str(official), "--model", "swin_pico", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: unknown model 'swin_pico'") and len(err.splitlines()) == 1


def test_integer_weights_are_refused_in_one_line(tmp_path):
    """An int8 safetensors file (quantised, or not weights at all) would be cast into the float weights silently."""
    from safetensors.torch import save_file

    from swinlab.errors import CheckpointError
    src = create_model("swin_pico_patch2_window4_32", num_classes=3)
    sd = {k: (v * 100).to(torch.int8) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError) as err:
        create_model("swin_pico_patch2_window4_32", num_classes=3, checkpoint=str(tmp_path / "int8.safetensors"))
    assert "torch.int8 values for floating-point weights" in str(err.value) and "\n" not in str(err.value)
    # one uint8 tensor among floats: the count and the first offending key (safetensors sorts its keys)
    one = dict(src.state_dict(), **{"norm.weight": torch.zeros(src.num_features, dtype=torch.uint8)})
    save_file(one, str(tmp_path / "one.safetensors"))
    with pytest.raises(CheckpointError, match=r"holds torch\.uint8 values for floating-point weights \(1 tensors, "
                                              r"first norm\.weight\)"):
        create_model("swin_pico_patch2_window4_32", num_classes=3, checkpoint=str(tmp_path / "one.safetensors"))
    half = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    save_file(half, str(tmp_path / "half.safetensors"))  # half precision is a float: loaded (and cast)
    create_model("swin_pico_patch2_window4_32", num_classes=3, checkpoint=str(tmp_path / "half.safetensors"))


def test_a_checkpoint_of_a_changed_width_loads_with_the_same_settings_only(tmp_path):
    """A swinlab file saved from a variant built narrower (``embed_dim``/``depths``/``num_heads`` given) loads when the
    same settings are given again, at another window too (what an ablation study's transfer does), and otherwise
    names the fields that differ and the fix."""
    from swinlab.models import create_model, save_safetensors
    narrow = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    name = "swinv2_pico_patch2_window4_32"
    model = create_model(name, num_classes=10, **narrow)
    path = save_safetensors(model, tmp_path / "narrow.safetensors", name)
    again = create_model(name, checkpoint=str(path), window_size=8, **narrow)
    assert torch.equal(again.head.fc.weight, model.head.fc.weight) and again.config.embed_dim == 8
    with pytest.raises(CheckpointError) as err:
        create_model(name, checkpoint=str(path))
    assert str(err.value) == (f"checkpoint {path} was saved from '{name}', whose embed_dim, depths, num_heads differ "
                              f"from '{name}': create it with model='{name}'")
    with pytest.raises(CheckpointError) as err:
        create_model(name, checkpoint=str(path), embed_dim=8)
    assert str(err.value) == (f"checkpoint {path} was saved from '{name}', whose depths, num_heads differ from "
                              f"'{name}' with {{'embed_dim': 8}}: create it with model='{name}' and the same settings")
    # saved without a variant name (a model built from a config): the fix is the saved values
    from swinlab.models import SwinTransformer
    unnamed = save_safetensors(SwinTransformer(model.config), tmp_path / "unnamed.safetensors")
    with pytest.raises(CheckpointError) as err:
        create_model(name, checkpoint=str(unnamed), embed_dim=8)
    assert str(err.value) == (f"checkpoint {unnamed} was saved from another model, whose depths, num_heads differ "
                              f"from '{name}' with {{'embed_dim': 8}}: create it with depths=[1, 1, 1, 1], "
                              f"num_heads=[1, 1, 1, 1]")
    # a plain state dict of another width: refused by the loader, which names the file
    torch.save(model.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(tmp_path / 'narrow.pth'))} does not fit "
                                              rf"{name} \("):
        create_model(name, checkpoint=str(tmp_path / "narrow.pth"))


# -- what a checkpoint is, read off its state dict (the "which variant fits" error of a wrong checkpoint) -------------

# the papers' sizes (Swin Table 1 of sizes / SwinV2 Table 2), independent of the registry
PAPER_ARCH = {
    "swin_tiny_patch4_window7_224": dict(version="v1", embed_dim=96, patch_size=4, depths=[2, 2, 6, 2],
                                         num_heads=[3, 6, 12, 24], window=7),
    "swin_base_patch4_window12_384": dict(version="v1", embed_dim=128, patch_size=4, depths=[2, 2, 18, 2],
                                          num_heads=[4, 8, 16, 32], window=12),
    "swinv2_tiny_window8_256": dict(version="v2", embed_dim=96, patch_size=4, depths=[2, 2, 6, 2],
                                    num_heads=[3, 6, 12, 24], window=None),
    "swinv2_base_window12to24_192to384": dict(version="v2", embed_dim=128, patch_size=4, depths=[2, 2, 18, 2],
                                              num_heads=[4, 8, 16, 32], window=None),
}


FITS = {  # the registry's variants of the same size and version
    "swin_tiny_patch4_window7_224": ["swin_tiny_patch4_window7_224"],
    "swin_base_patch4_window12_384": ["swin_base_patch4_window12_384", "swin_base_patch4_window7_224"],
    "swinv2_tiny_window8_256": ["swinv2_tiny_window8_256", "swinv2_tiny_window16_256"],
    "swinv2_base_window12to24_192to384": ["swinv2_base_window8_256", "swinv2_base_window16_256",
                                          "swinv2_base_window12_192", "swinv2_base_window12to16_192to256",
                                          "swinv2_base_window12to24_192to384"],
}


@pytest.mark.parametrize("name", list(PAPER_ARCH))
def test_describe_reads_timms_state_dicts_as_the_papers_sizes(name):
    """timm's model (on meta) with its keys sorted as a safetensors file stores them ("blocks.10" before "blocks.2"):
    the architecture read off it is the paper's, and the registry variant of that name fits it."""
    from swinlab.models.checkpoint import describe_state_dict, fitting_variants
    with torch.device("meta"):
        ref = timm.create_model(name)
    sd = dict(sorted(ref.state_dict().items()))
    arch = describe_state_dict(sd)
    assert arch == PAPER_ARCH[name] and type(arch["window"]) is type(PAPER_ARCH[name]["window"])  # 7, not 7.0
    assert fitting_variants(sd) == FITS[name]  # V1: the same window first; V2's CPB fits every window


def test_describe_reads_the_heads_of_a_v2_without_cosine_attention():
    """The switches can drop V2's logit scale (dot attention) and the q/v biases: the heads then come from the CPB
    MLP's output layer and the version from the MLP's first layer. Without a position bias they come from the logit
    scale."""
    from swinlab.models.checkpoint import describe_state_dict
    with torch.device("meta"):
        model = create_model("swinv2_pico_patch2_window4_32", attention="dot", qkv_bias="none")
    sd = model.state_dict()
    assert not any(k.endswith(("logit_scale", "q_bias")) for k in sd)
    assert describe_state_dict(sd) == dict(version="v2", embed_dim=16, patch_size=2, depths=[2, 2, 2, 2],
                                           num_heads=[1, 2, 4, 8], window=None)
    with torch.device("meta"):  # and one with no position bias at all: the heads come from the logit scale
        sd = create_model("swinv2_pico_patch2_window4_32", position_bias="none").state_dict()
    assert not any("cpb_mlp" in k or "bias_table" in k for k in sd)
    assert describe_state_dict(sd)["num_heads"] == [1, 2, 4, 8]
    # V2's layout is told by any one of its keys: the logit scale alone, or the split q/v biases alone
    for only, kwargs in (("logit_scale", dict(position_bias="none", qkv_bias="none")),
                         ("q_bias", dict(attention="dot", position_bias="table", qkv_bias="qv"))):
        with torch.device("meta"):
            sd = create_model("swinv2_pico_patch2_window4_32", **kwargs).state_dict()
        markers = {m for m in ("logit_scale", "q_bias", "cpb_mlp.0.weight") if any(k.endswith(m) for k in sd)}
        assert markers == {only} and describe_state_dict(sd)["version"] == "v2"


def test_bias_table_resize_keeps_the_axes_of_a_non_square_window_and_the_dtype():
    """(Wh, Ww) = (4, 8) -> (8, 12): a table that varies along dy only keeps that after the resize (the axes are not
    swapped or squared), its shape is (15 x 23, heads), and a bf16 table stays bf16."""
    from swinlab.models.checkpoint import resize_bias_table
    dy = torch.arange(7, dtype=torch.float32).repeat_interleave(15)  # (2*4-1) x (2*8-1) grid, row-major
    table = torch.stack([dy, 2 * dy], dim=1).to(torch.bfloat16)
    out = resize_bias_table(table, (4, 8), (8, 12))
    assert out.shape == (15 * 23, 2) and out.dtype == torch.bfloat16
    grid = out.float().T.reshape(2, 15, 23)
    assert torch.equal(grid, grid[:, :, :1].expand_as(grid))  # constant along dx
    assert grid[0, 0, 0] < grid[0, 7, 0] < grid[0, 14, 0]  # and still rising along dy


def test_another_librarys_error_is_quoted_by_its_first_line():
    """A quoted error is its message's first line, cut at the limit (200 characters unless given); an empty message
    is quoted by the error's type."""
    from swinlab.errors import first_line
    assert first_line(OSError("disk full\nerrno 28\n")) == "disk full"
    assert first_line(RuntimeError("x" * 300)) == "x" * 200 and first_line(RuntimeError("y" * 300), 160) == "y" * 160
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError("  \n ")) == "ValueError"


def test_save_safetensors_metadata_as_the_safetensors_library_reads_it(tmp_path, monkeypatch):
    """Into folders that do not exist yet; the metadata (read by safetensors itself): format, the variant name (the
    model's own unless given, empty for a model built from a bare config), the config and the preprocessing (the
    model's pretrained_cfg) as JSON. The write goes
    through a hidden temporary file beside the target, which is gone afterwards, also when the write fails."""
    from safetensors import safe_open
    from safetensors import torch as st_torch

    from swinlab.models import SwinTransformer
    from swinlab.models.checkpoint import save_safetensors
    model = create_model("swinv2_pico_patch2_window4_32", num_classes=3)
    path = tmp_path / "a" / "b" / "m.safetensors"
    temps = []
    real = st_torch.save_file
    monkeypatch.setattr(st_torch, "save_file", lambda s, f, metadata=None: temps.append(f) or real(s, f, metadata))
    assert save_safetensors(model, path) == path
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta == {"format": "pt", "swinlab_model": "swinv2_pico_patch2_window4_32",
                        "swinlab_config": json.dumps(model.config.to_dict()), "pretrained_cfg": meta["pretrained_cfg"]}
    # the preprocessing its weights expect: swinlab's defaults for a variant timm has no config of
    assert json.loads(meta["pretrained_cfg"]) == dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                                                      input_size=[3, 32, 32], interpolation="bicubic", crop_pct=0.9)
    tmp = temps[0]
    assert os.path.dirname(tmp) == str(path.parent) and os.path.basename(tmp).startswith(".m.safetensors.")
    assert tmp.endswith(".tmp") and sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    save_safetensors(model, path, model_name="mine", extra_metadata={"step": "7"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["swinlab_model"] == "mine" and f.metadata()["step"] == "7"
    save_safetensors(SwinTransformer(model.config), path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["swinlab_model"] == ""
    before = path.read_bytes()

    def full(state, filename, metadata=None):
        with open(filename, "wb") as out:
            out.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st_torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"could not write .*m.safetensors \(No space left on device\): any "):
        save_safetensors(model, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]
    monkeypatch.setattr(st_torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(model, path)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]


def test_a_v2_checkpoint_moved_to_another_size_keeps_the_windows_its_cpb_was_trained_against(tmp_path):
    """Moved to 64 px / window 8 (no pretrained window given), a V2 checkpoint's CPB is normalised by the windows it
    was trained against: its own pretrained windows when it had them (2, 2, 2 and 1 here), else the windows it ran
    at (4 in stages 0-2; 2 in stage 3, whose 2 x 2 grid clamps the window)."""
    from swinlab.models import save_safetensors
    for trained_with, expected in (((2, 2, 2, 1), [[2, 2], [2, 2], [2, 2], [1, 1]]),
                                   (None, [[4, 4], [4, 4], [4, 4], [2, 2]])):
        kwargs = {} if trained_with is None else dict(pretrained_window_size=trained_with)
        path = save_safetensors(create_model("swinv2_pico_patch2_window4_32", num_classes=3, **kwargs),
                                tmp_path / "m.safetensors")
        for move in (dict(img_size=64, window_size=8), dict(img_size=64), dict(window_size=8)):  # either one moves it
            moved = create_model("swinv2_pico_patch2_window4_32", checkpoint=str(path), **move)
            assert moved.config.resolved().pretrained_window_size == expected, move


def test_safe_torch_load_names_a_missing_file_and_refuses_pickled_code(tmp_path):
    """A missing path is one line naming it; a file holding a pickled object that is not a tensor container is
    refused (``weights_only=True``), whatever torch's own default."""
    from swinlab.models.checkpoint import safe_torch_load
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pth does not exist: check the path"):
        safe_torch_load(tmp_path / "nope.pth")
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pth")
    assert torch.equal(safe_torch_load(tmp_path / "ok.pth")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "obj": PicklePayload()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"refused to load .*bad\.pth: it holds Python objects") as err:
        safe_torch_load(tmp_path / "bad.pth")
    assert "(test_checkpoint.PicklePayload); swinlab loads tensors only" in str(err.value)  # what torch refused
    assert "\x1b" not in str(err.value)
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.pth \(not a readable zip archive .*\): the "
                                              r"file is truncated"):
        safe_torch_load(tmp_path / "cut.pth")  # the opcode check cannot follow it: nothing is unpickled


def test_unpickling_reason_is_the_refused_name_or_the_first_line_without_colour_codes():
    """torch names what ``weights_only`` refused in an "Unsupported global: GLOBAL <name>" line; any other refusal is
    quoted by its first line, cut to 120 characters, with the terminal colour codes torch puts there taken out."""
    import pickle

    from swinlab.models.checkpoint import unpickling_reason
    named = pickle.UnpicklingError("\x1b[1mWeights only load failed.\x1b[0m Re-running ...\nWeightsUnpickler error: "
                                   "Unsupported global: GLOBAL posix.system was not an allowed global")
    assert unpickling_reason(named) == "posix.system"
    head = "\x1b[1mWeights only load failed.\x1b[0m \x1b[31;1m"  # 41 characters, 15 of them colour codes
    other = pickle.UnpicklingError(head + "y" * 200 + "\nWeightsUnpickler error: Unsupported operand 149")
    # cut to 120 first (79 of the y), then the colour codes come out
    assert unpickling_reason(other) == "Weights only load failed. " + "y" * (120 - 41)


class PicklePayload:
    """A class torch.load(weights_only=True) must not construct."""


def test_num_classes_come_from_the_checkpoints_head_in_either_layout(tmp_path):
    """Without num_classes, a checkpoint's classifier sets it: swinlab/timm's ``head.fc`` or the official ``head``.
    An official backbone without a head (its downsample still at the end of each stage) loads into a feature
    extractor with every weight equal, and a headless timm state dict keeps the variant's default head."""
    name = "swin_pico_patch2_window4_32"
    src = randomize_(timm_twin(name, num_classes=7))
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    torch.save(to_official(src.state_dict(), src), tmp_path / "official.pth")
    for file in ("timm.pth", "official.pth"):
        model = create_model(name, checkpoint=str(tmp_path / file))
        assert model.num_classes == 7 and torch.equal(model.head.fc.weight, src.head.fc.weight), file
    official = to_official(src.state_dict(), src)["model"]
    backbone = {k: v for k, v in official.items() if not k.startswith("head.")}
    torch.save(backbone, tmp_path / "backbone.pth")
    features = create_model(name, checkpoint=str(tmp_path / "backbone.pth"), num_classes=0)
    mine = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(features.state_dict()[k], v) for k, v in mine.items())
    torch.save(mine, tmp_path / "headless.pth")
    with pytest.warns(UserWarning, match="has no classifier head"):
        default = create_model(name, checkpoint=str(tmp_path / "headless.pth"))
    assert default.num_classes == create_model(name).num_classes


def test_a_head_of_another_size_is_reinitialised_only_when_asked(tmp_path):
    """num_classes given (reset_head): the head is replaced and a warning names both sizes; loading the same
    state dict directly without reset_head refuses the mismatch and names the model."""
    from swinlab.models import load_into_model
    name = "swin_pico_patch2_window4_32"
    src = randomize_(timm_twin(name, num_classes=7))
    torch.save(src.state_dict(), tmp_path / "seven.pth")
    with pytest.warns(UserWarning, match=r"classifier head has 7 classes, the model 3: head re-initialised"):
        three = create_model(name, checkpoint=str(tmp_path / "seven.pth"), num_classes=3)
    assert three.num_classes == 3 and torch.equal(three.patch_embed.proj.weight, src.patch_embed.proj.weight)
    target = create_model(name, num_classes=3)
    with pytest.raises(CheckpointError, match=rf"does not fit {name} \(2 shape mismatches.*only the classifier "
                                              r"differs \(7 classes in the checkpoint\): create the model with "
                                              r"num_classes=7, or load with reset_head=True"):
        load_into_model(target, src.state_dict(), source=target.config)
    same = create_model(name, num_classes=7)
    load_into_model(same, src.state_dict(), source=same.config)  # same head size: loaded, not reset
    assert torch.equal(same.head.fc.weight, src.head.fc.weight)


def test_a_plain_state_dict_saved_at_another_window_is_read_off_its_square_table(tmp_path):
    """A .pth without metadata, trained at window 8 and 64 px, loaded by a name whose default is window 4 at 32 px:
    the tables do not match the name's geometry, so the source window comes from each table's side (15 -> 8) and
    stage 0's table is resized 15 x 15 -> 11 x 11 by the official bicubic formula. Stage 3 (4 x 4 tokens, its window
    clamped to 4 in both models) keeps its 7 x 7 table as is."""
    name = "swin_pico_patch2_window4_32"
    src = randomize_(create_model(name, img_size=64, window_size=8))
    torch.save(src.state_dict(), tmp_path / "w8.pth")
    moved = create_model(name, checkpoint=str(tmp_path / "w8.pth"), img_size=64, window_size=6)
    assert_stage0_resized_stage3_kept(src, moved, (15, 15), (11, 11))


def test_load_into_model_names_the_weights_the_model_and_two_problems_of_each_kind():
    """The refusal of a state dict that fits nothing: "<state dict>" and "the model" when neither is named (a model
    built from a config), the counts, the first two shape mismatches, missing and unexpected keys in the state
    dict's order, and no "it fits" hint (no registered variant has embed_dim 24)."""
    from swinlab.models import SwinTransformer, load_into_model
    model = SwinTransformer(create_model("swin_pico_patch2_window4_32").config.replace(embed_dim=24))
    sd = dict(model.state_dict())
    renamed = ["layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias", "layers.0.blocks.0.norm2.weight"]
    for k in renamed:
        sd[k.replace("norm", "nrm")] = sd.pop(k)
    widened = ["patch_embed.norm.weight", "patch_embed.norm.bias", "norm.weight"]
    for k in widened:
        sd[k] = torch.zeros(sd[k].shape[0] + 1)
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, sd, source=model.config)
    n = model.config.embed_dim
    m = n * 2 ** (len(model.layers) - 1)
    assert str(err.value) == (
        f"checkpoint <state dict> does not fit the model (3 shape mismatches, 3 missing, 3 unexpected keys; first: "
        f"patch_embed.norm.weight: ({n + 1},) in the checkpoint vs ({n},) in the model; "
        f"patch_embed.norm.bias: ({n + 1},) in the checkpoint vs ({n},) in the model; "
        f"missing {renamed[0]}; missing {renamed[1]}; "
        f"unexpected layers.0.blocks.0.nrm1.weight; unexpected layers.0.blocks.0.nrm1.bias); "
        f"no registered variant fits it: check the checkpoint")
    assert f"norm.weight: ({m + 1},)" not in str(err.value)


def test_load_into_model_names_the_first_three_variants_a_refused_state_dict_fits():
    """A SwinV2-B state dict (five registered variants fit it: the CPB has no window-sized table) into a SwinV2-T:
    the hint names the first three, in the registry's order."""
    from swinlab.models import load_into_model
    from swinlab.models.checkpoint import fitting_variants
    with torch.device("meta"):
        base = create_model("v2_b").state_dict()
        tiny = create_model("v2_t")
    assert len(fitting_variants(base)) == 5
    with pytest.raises(CheckpointError, match=r"checkpoint b\.pth does not fit swinv2_tiny_window8_256 \(.*\); it fits "
                                              r"swinv2_base_window8_256, swinv2_base_window16_256, "
                                              r"swinv2_base_window12_192: create that model instead$"):
        load_into_model(tiny, base, source=tiny.config, checkpoint="b.pth")


def test_a_checkpoint_missing_only_its_head_bias_is_refused_and_a_weight_only_head_is_dropped_or_reset():
    """The head is skipped only when it is absent or being re-initialised: a state dict whose head lost its bias
    is refused (not loaded with a random bias). A head without a bias entry is dropped for a feature extractor
    and re-initialised when asked, like a full one."""
    from swinlab.models import load_into_model
    name = "swin_pico_patch2_window4_32"
    src = randomize_(create_model(name, num_classes=7))
    sd = {k: v for k, v in src.state_dict().items() if k != "head.fc.bias"}
    same = create_model(name, num_classes=7)
    with pytest.raises(CheckpointError, match=r"\(0 shape mismatches, 1 missing, 0 unexpected keys; first: missing "
                                              r"head\.fc\.bias\)"):
        load_into_model(same, sd, source=same.config)
    features = create_model(name, num_classes=0)
    load_into_model(features, sd, source=features.config)
    assert torch.equal(features.patch_embed.proj.weight, src.patch_embed.proj.weight)
    three = create_model(name, num_classes=3)
    with pytest.warns(UserWarning, match="classifier head has 7 classes, the model 3"):
        load_into_model(three, sd, source=three.config, reset_head=True)
    assert torch.equal(three.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_head_warnings_point_at_the_callers_line_and_a_matching_checkpoint_loads_silently(tmp_path):
    """The two head warnings are reported at the line that called create_model (stacklevel 3), not inside swinlab;
    a checkpoint whose head matches loads without any warning."""
    import warnings
    name = "swin_pico_patch2_window4_32"
    src = randomize_(create_model(name, num_classes=7))
    torch.save(src.state_dict(), tmp_path / "seven.pth")
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("head.")}, tmp_path / "backbone.pth")
    with pytest.warns(UserWarning, match="head re-initialised") as reset:
        create_model(name, checkpoint=str(tmp_path / "seven.pth"), num_classes=3)
    with pytest.warns(UserWarning, match="has no classifier head") as headless:
        create_model(name, checkpoint=str(tmp_path / "backbone.pth"))
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampoline adds a frame: tests/mutate_constants.py checks it
        for record in (reset, headless):
            assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = create_model(name, checkpoint=str(tmp_path / "seven.pth"))
    assert torch.equal(same.head.fc.bias, src.head.fc.bias)
