"""Pretrained weights by name (issue #13), offline: a Hugging Face cache and a torch.hub cache built in tmp_path with
random weights; swinlab's model loaded from them equals timm's loaded from the same cache; one-line errors."""
import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from helpers import randomize_
from safetensors.torch import save_file
from test_checkpoint import to_official
from test_models import timm_twin

import swinlab
from swinlab.errors import CheckpointError, ConfigError
from swinlab.models import hub, list_tags
from swinlab.tools import catalog

COMMIT = "0123456789abcdef0123456789abcdef01234567"
V1_TAG = "swin_tiny_patch4_window7_224.ms_in1k"
V2_TAG = "swinv2_tiny_window8_256.ms_in1k"


@pytest.fixture(scope="module")
def weights():
    """timm state dicts with random weights for the two tags (built once: Swin-T is 28M parameters)."""
    out = {}
    for seed, tag in enumerate((V1_TAG, V2_TAG)):
        model = randomize_(timm.create_model(tag.split(".")[0]), seed=seed + 3, std=0.02)
        out[tag] = {k: v.contiguous() for k, v in model.state_dict().items()}
    return out


def put_in_hf_cache(cache, repo_id, state_dict):
    """The layout hf_hub_download reads: models--org--name/{refs/main, snapshots/<commit>/model.safetensors}."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(snapshot / "model.safetensors"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline (the constants are read at import: patch them too)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _logits(model, size, seed=0):
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("tag,size", [(V1_TAG, 224), (V2_TAG, 256)])
def test_tag_pretrained_equals_timm_from_the_same_cache(hf_cache, weights, tag, size):
    put_in_hf_cache(hf_cache, f"timm/{tag}", weights[tag])
    ref = timm.create_model(tag, pretrained=True)
    ours = swinlab.create_model(tag, pretrained=True)
    expected = _logits(ref, size)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(_logits(ours, size), expected, atol=1e-5, rtol=1e-5)
    assert ours.pretrained_cfg["tag"] == "ms_in1k" and ours.pretrained_cfg["input_size"] == (3, size, size)
    assert swinlab.create_model(f"hf-hub:timm/{tag}").pretrained_cfg["tag"] == "ms_in1k"
    assert swinlab.create_model(f"hf-hub:timm/{tag}@main").pretrained_cfg["tag"] == "ms_in1k"  # a revision too
    # the same weights by every other spelling: architecture + default tag, the tag alone, an alias, hf-hub:
    arch = tag.split(".")[0]
    own = ours.state_dict()
    spellings = [dict(name=arch, pretrained=True), dict(name=arch, pretrained="ms_in1k"),
                 dict(name=arch, checkpoint=f"hf-hub:timm/{tag}"), dict(name=f"hf-hub:timm/{tag}")]
    if arch == "swinv2_tiny_window8_256":
        spellings.append(dict(name="v2_t.ms_in1k", pretrained=True))
    for kw in spellings:
        other = swinlab.create_model(**kw).state_dict()
        assert own.keys() == other.keys() and all(torch.equal(v, other[k]) for k, v in own.items()), kw


def test_pretrained_with_another_head_and_size_and_through_timm(hf_cache, weights):
    put_in_hf_cache(hf_cache, f"timm/{V2_TAG}", weights[V2_TAG])
    with pytest.warns(UserWarning, match="head re-initialised"):
        model = swinlab.create_model(V2_TAG, pretrained=True, num_classes=10)
    assert model.num_classes == 10
    assert torch.equal(model.patch_embed.proj.weight, weights[V2_TAG]["patch_embed.proj.weight"])
    via_timm = timm.create_model("swinlab_swinv2_tiny_window8_256.ms_in1k", pretrained=True)
    assert torch.equal(via_timm.head.fc.weight, weights[V2_TAG]["head.fc.weight"])


def test_hf_repo_with_only_a_pytorch_bin_is_read_weights_only(hf_cache):
    name = "swin_pico_patch2_window4_32"
    src = randomize_(timm_twin(name))
    folder = hf_cache / "models--someone--pico-finetune" / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    (hf_cache / "models--someone--pico-finetune" / "refs").mkdir()
    (hf_cache / "models--someone--pico-finetune" / "refs" / "main").write_text(COMMIT)
    torch.save(src.state_dict(), folder / "pytorch_model.bin")
    ours = swinlab.create_model(name, checkpoint="hf-hub:someone/pico-finetune")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), src.eval()(x), atol=1e-5, rtol=1e-5)


def test_url_checkpoint_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = "swin_pico_patch2_window4_32"
    src = randomize_(timm_twin(name))
    url = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_pico_patch2_window4_32.pth"
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "swin_pico_patch2_window4_32.pth"
    assert hub.url_cache_path(url) == cached
    calls = []

    def fake_download(u, dst, *args, **kwargs):  # what a download would write: the official layout
        calls.append(u)
        torch.save(to_official(src.state_dict(), src), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    first = swinlab.create_model(name, checkpoint=url)
    assert calls == [url] and cached.is_file()
    second = swinlab.create_model(name, checkpoint=url)  # cached: no second download
    assert calls == [url]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = src.eval()(x)
        torch.testing.assert_close(first.eval()(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second.eval()(x), expected, atol=1e-5, rtol=1e-5)

    def no_network(u, dst, *args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(CheckpointError) as err:
        swinlab.create_model(name, checkpoint=url.replace(".pth", "_other.pth"))
    assert "\n" not in str(err.value) and "put the file at" in str(err.value) and "checkpoints" in str(err.value)
    assert "OSError: [Errno -3] Temporary failure in name resolution" in str(err.value)  # the cause, quoted

    def long_error(u, dst, *args, **kwargs):
        raise OSError("y" * 300)

    monkeypatch.setattr(torch.hub, "download_url_to_file", long_error)
    with pytest.raises(CheckpointError, match=rf"\(OSError: {'y' * 160}\): check the "):  # cut to 160 characters
        swinlab.create_model(name, checkpoint=url.replace(".pth", "_other.pth"))
    with pytest.raises(CheckpointError, match=r"https://example.com/weights/ names no file: give the URL of the "):
        swinlab.create_model(name, checkpoint="https://example.com/weights/")


def test_offline_with_an_empty_cache_is_one_line(hf_cache):
    with pytest.raises(CheckpointError) as err:
        swinlab.create_model(V2_TAG, pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE=1" in msg and "run once online or copy the cache" in msg
    assert "timm/swinv2_tiny_window8_256.ms_in1k" in msg
    with pytest.raises(CheckpointError, match="not a Hugging Face repo id"):
        swinlab.create_model("swin_pico_patch2_window4_32", checkpoint="hf-hub:no-slash")


def test_unknown_tag_and_no_weights_are_one_line():
    with pytest.raises(ConfigError) as err:
        swinlab.create_model("swin_tiny_patch4_window7_224.ms_in99k", pretrained=True)
    assert "\n" not in str(err.value)
    assert "ms_in99k" in str(err.value) and "ms_in1k, ms_in22k, ms_in22k_ft_in1k" in str(err.value)
    with pytest.raises(ConfigError, match="no public pretrained weights"):
        swinlab.create_model("swinv2_pico_patch2_window4_32", pretrained=True)
    with pytest.raises(ConfigError, match="name two tags"):
        swinlab.create_model(V2_TAG, pretrained="ms_in22k")
    with pytest.raises(ConfigError, match="both give weights"):
        swinlab.create_model(V2_TAG, pretrained=True, checkpoint="x.pth")
    with pytest.raises(ConfigError, match="cannot tell the architecture"):
        swinlab.create_model("hf-hub:someone/my-finetune")


def test_catalog_lists_the_tags(monkeypatch, capsys):
    assert list_tags("swin_tiny_patch4_window7_224") == ["ms_in1k", "ms_in22k", "ms_in22k_ft_in1k"]
    # timm's default tag first (what timm.create_model(..., pretrained=True) loads), then the others in order
    assert list_tags("swin_base_patch4_window7_224") == ["ms_in22k_ft_in1k", "ms_in1k", "ms_in22k"]
    assert list_tags("swinv2_base_window12to16_192to256") == ["ms_in22k_ft_in1k"]
    assert list_tags("swinv2_giant_window12_192") == []
    names = ("swinv2_tiny_window8_256", "swinv2_pico_patch2_window4_32")
    monkeypatch.setattr(catalog, "REGISTRY", {k: swinlab.models.REGISTRY[k] for k in names})
    assert catalog.main(["--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["swinv2_tiny_window8_256"]["pretrained_tags"] == ["ms_in1k"]
    assert rows["swinv2_pico_patch2_window4_32"]["pretrained_tags"] == []
    assert catalog.main([]) == 0
    table = capsys.readouterr().out
    assert "| pretrained tags |" in table and "| 5.94 | ms_in1k |" in table


def test_fetch_hf_asks_for_the_revision_then_the_next_file_and_names_each_failure(monkeypatch):
    """``org/name@rev``: ``hf_hub_download`` is asked for model.safetensors, then pytorch_model.bin, both at that
    revision. Every way it can fail gives its own line: not cached (offline or not), neither file in the repo, any other
    error quoted by its first line; a repo id that is not org/name is refused before anything is asked."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    calls, outcomes = [], {}

    def download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        result = outcomes[filename]
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "hub_unreachable", lambda *args: None)  # the Hub answers (unreachable: test_no_network)
    outcomes.update({"model.safetensors": LocalEntryNotFoundError("not cached"), "pytorch_model.bin": "/c/model.bin"})
    assert str(hub.fetch_hf("org/name@v1.0")) == "/c/model.bin"
    assert calls == [("org/name", "model.safetensors", "v1.0"), ("org/name", "pytorch_model.bin", "v1.0")]
    calls.clear()
    assert str(hub.fetch_hf("org/name")) == "/c/model.bin" and calls[0] == ("org/name", "model.safetensors", None)
    outcomes["model.safetensors"] = EntryNotFoundError("404")  # not in the repo: the next name is tried too
    assert str(hub.fetch_hf("org/name")) == "/c/model.bin"
    outcomes.update({f: LocalEntryNotFoundError("not cached") for f in outcomes})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/the/hf/cache")
    for offline, words in ((True, "HF_HUB_OFFLINE=1: run once online"), (False, "the Hub could not be reached")):
        monkeypatch.setattr(constants, "is_offline_mode", lambda offline=offline: offline)
        not_cached = f"hf-hub:org/name weights are not in the Hugging Face cache \\(/the/hf/cache\\) .*{words}"
        with pytest.raises(CheckpointError, match=not_cached):
            hub.fetch_hf("org/name")
    outcomes.update({f: EntryNotFoundError("404") for f in outcomes})
    with pytest.raises(CheckpointError, match=r"^hf-hub:org/name holds neither of model.safetensors, pytorch_model"):
        hub.fetch_hf("org/name")
    outcomes["model.safetensors"] = RuntimeError("401 Client Error\nfor url ...")
    with pytest.raises(CheckpointError, match=r"cannot download hf-hub:org/name \(RuntimeError: 401 Client Error\): "):
        hub.fetch_hf("org/name")
    outcomes["model.safetensors"] = RuntimeError("x" * 300)  # a long first line is cut to 160 characters
    with pytest.raises(CheckpointError, match=rf"cannot download hf-hub:org/name \(RuntimeError: {'x' * 160}\): "):
        hub.fetch_hf("org/name")
    calls.clear()
    for bad in ("org/", "/name", "org/name/x", "name"):
        with pytest.raises(CheckpointError, match="is not a Hugging Face repo id"):
            hub.fetch_hf(bad)
    assert calls == []


def test_weights_source_prefers_the_hub_copy_then_the_url():
    assert hub.weights_source({"hf_hub_id": "timm/a.b", "url": "https://x/a.pth"}) == "hf-hub:timm/a.b"
    assert hub.weights_source({"url": "https://x/a.pth"}) == "https://x/a.pth"
    with pytest.raises(ConfigError, match=r"^swin_x\.tag_y has no downloadable weights in timm's config"):
        hub.weights_source({"architecture": "swin_x", "tag": "tag_y", "url": ""})


def test_fetch_routes_hub_names_urls_and_paths(monkeypatch, tmp_path):
    """``hf-hub:`` names go to the Hugging Face cache, http and https URLs to the torch.hub cache, the rest is a
    path as given."""
    seen = []
    monkeypatch.setattr(hub, "fetch_hf", lambda repo: seen.append(("hf", repo)) or tmp_path / "a")
    monkeypatch.setattr(hub, "fetch_url", lambda url: seen.append(("url", url)) or tmp_path / "b")
    assert hub.fetch("hf-hub:org/name@rev") == tmp_path / "a"
    assert hub.fetch("http://host/w.pth") == hub.fetch("https://host/w.pth") == tmp_path / "b"
    assert hub.fetch(tmp_path / "local.pth") == tmp_path / "local.pth" and hub.fetch("rel/x.pth") == Path("rel/x.pth")
    assert seen == [("hf", "org/name@rev"), ("url", "http://host/w.pth"), ("url", "https://host/w.pth")]


def test_a_hub_repo_name_stands_for_its_architecture_and_timms_tag():
    """timm names its repos ``arch.tag``: a tag timm has gives that tag's config (a revision after ``@`` is not part
    of it); any other suffix is someone's own fine-tune of the architecture."""
    from swinlab.models.factory import _hub_architecture
    tiny = "swin_tiny_patch4_window7_224"
    assert _hub_architecture(f"timm/{tiny}.ms_in22k@main") == f"{tiny}.ms_in22k"
    assert _hub_architecture(f"timm/{tiny}.ms_in1k") == f"{tiny}.ms_in1k"
    assert _hub_architecture(f"someone/{tiny}.my_ft") == tiny
    assert _hub_architecture("someone/swinv2_pico_patch2_window4_32") == "swinv2_pico_patch2_window4_32"


def test_count_params_applies_the_overrides_as_timm_does():
    from swinlab.models import count_params
    for kwargs in (dict(num_classes=10), dict(num_classes=0), dict(embed_dim=64, num_heads=(2, 4, 8, 16))):
        with torch.device("meta"):
            ref = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
        assert count_params("v1_t", **kwargs) == sum(p.numel() for p in ref.parameters()), kwargs



def test_create_model_refuses_a_name_that_is_not_a_string_weights_given_twice_and_stray_out_indices():
    from swinlab.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^model name must be a string, got 3$"):
        swinlab.create_model(3)
    for kwargs in (dict(checkpoint="w.pth"), dict(pretrained=True)):
        with pytest.raises(ConfigError, match=r"^hf-hub:org/name already names its weights: drop "
                                              r"checkpoint=/pretrained=$"):
            swinlab.create_model("hf-hub:org/name", **kwargs)
    with pytest.raises(ConfigError, match=r"^out_indices is for features_only=True models: add features_only=True, "
                                          r"or drop it$"):
        swinlab.create_model("v1_pico", out_indices=(1, 2))
