"""Backbone: layer taps, input sizes, text truncation, weight loading."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from model.backbone import ClipBackbone, default_layers, load_backbone
from model.errors import WeightsFormatError, WeightsNotFoundError
from model.weights_source import BackboneSpec, resolve_weights


@pytest.mark.parametrize("size", [64, 96, 128])
def test_patch_tokens_follow_input_size(tiny_backbone: ClipBackbone, size: int) -> None:
    pixels = torch.randn(2, 3, size, size)
    features = tiny_backbone.encode_image(pixels, [1, 2, 3, 4])
    grid = size // tiny_backbone.patch_size
    assert features.grid == (grid, grid)
    assert len(features.patch_tokens) == 4
    for tokens in features.patch_tokens:
        assert tokens.shape == (2, grid * grid, tiny_backbone.embed_dim)
        torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, grid * grid))
    assert features.global_embedding.shape == (2, tiny_backbone.embed_dim)
    assert features.layer_class_tokens[0].shape == (2, tiny_backbone.vision_width)


def test_native_size_matches_open_clip(tiny_backbone: ClipBackbone) -> None:
    pixels = torch.randn(2, 3, 64, 64)
    ours = tiny_backbone.encode_image(pixels, [4]).global_embedding
    reference = tiny_backbone.clip.encode_image(pixels, normalize=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_layer_taps_are_distinct(tiny_backbone: ClipBackbone) -> None:
    features = tiny_backbone.encode_image(torch.randn(1, 3, 64, 64), [1, 2, 3, 4])
    tokens = features.patch_tokens
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            assert tokens[i].data_ptr() != tokens[j].data_ptr()
            assert (tokens[i] - tokens[j]).abs().max() > 1e-3


def test_backbone_is_frozen(tiny_backbone: ClipBackbone) -> None:
    assert all(not parameter.requires_grad for parameter in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.clip.training


def test_text_truncation_changes_nothing(tiny_backbone: ClipBackbone) -> None:
    texts = ["a photo of a metal nut.", "X X X X damaged object with a long scratch across it."]
    tokens = tiny_backbone.tokenize(texts)
    truncated = tiny_backbone.encode_texts(texts)
    full = tiny_backbone.clip.encode_text(tokens, normalize=True)  # full 77-token context
    assert (truncated - full).abs().max() < 1e-5


def test_default_layers_are_quarter_points() -> None:
    assert default_layers(24) == (6, 12, 18, 24)
    assert default_layers(12) == (3, 6, 9, 12)
    assert default_layers(4) == (1, 2, 3, 4)


def test_tiny_backbone_always_reports_random_weights() -> None:
    resolved = resolve_weights(BackboneSpec("tiny-clip-random", "openai"))
    assert resolved.label == "random" and resolved.path is None


def test_missing_tag_weights_raise_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_network)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", no_network)
    spec = BackboneSpec("ViT-B-16", "openai", cache_dir=str(tmp_path / "cache"), allow_download=False)
    with pytest.raises(WeightsNotFoundError) as error:
        load_backbone(spec)
    message = str(error.value)
    assert "open_clip_model.safetensors" in message or "open_clip_pytorch_model.bin" in message
    assert "timm/vit_base_patch16_clip_224.openai" in message
    assert "GENCLIP_ALLOW_DOWNLOAD" in message


def test_missing_weight_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.safetensors"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        load_backbone(BackboneSpec("ViT-B-16", str(missing)))


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(WeightsNotFoundError, match="openai"):
        resolve_weights(BackboneSpec("ViT-L-14-336", "laion9000"))


def test_wrong_architecture_file_is_a_clear_error(tmp_path: Path, tiny_backbone: ClipBackbone) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.clip.state_dict().items()}, str(path))
    with pytest.raises(WeightsFormatError, match="Cannot load backbone weights"):
        load_backbone(BackboneSpec("ViT-B-16", str(path)))


def test_cached_tag_is_found_offline(tmp_path: Path, tiny_backbone: ClipBackbone) -> None:
    """A file laid out like the HF cache is used for the tag, with no network."""
    cache = tmp_path / "cache"
    snapshot = cache / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (cache / "models--timm--vit_base_patch16_clip_224.openai" / "refs").mkdir()
    (cache / "models--timm--vit_base_patch16_clip_224.openai" / "refs" / "main").write_text("abc")
    (snapshot / "open_clip_model.safetensors").write_bytes(b"placeholder")
    resolved = resolve_weights(BackboneSpec("ViT-B-16", "openai", cache_dir=str(cache)))
    assert resolved.path == snapshot / "open_clip_model.safetensors"
    assert resolved.label == "openai" and resolved.quick_gelu


def test_vit_l_14_336_round_trips_through_a_local_file(tmp_path: Path) -> None:
    """A random-weight ViT-L-14-336 saved to a file loads back through the local-checkpoint path."""
    torch.manual_seed(0)
    original = load_backbone(BackboneSpec("ViT-L-14-336", "random", quick_gelu=True))
    path = tmp_path / "vit_l_14_336.safetensors"
    save_file({k: v.contiguous() for k, v in original.clip.state_dict().items()}, str(path))
    loaded = load_backbone(BackboneSpec("ViT-L-14-336", str(path)))
    assert loaded.weights_label == str(path)
    assert loaded.quick_gelu  # OpenAI architecture: QuickGELU by default for local files
    pixels = torch.randn(1, 3, 56, 56)  # 4x4 grid keeps the CPU cost small
    with torch.inference_mode():
        a = original.encode_image(pixels, [6, 12, 18, 24])
        b = loaded.encode_image(pixels, [6, 12, 18, 24])
        text_a = original.encode_texts(["a photo of a screw."])
        text_b = loaded.encode_texts(["a photo of a screw."])
    assert torch.equal(a.global_embedding, b.global_embedding)
    for x, y in zip(a.patch_tokens, b.patch_tokens):
        assert torch.equal(x, y)
    assert torch.equal(text_a, text_b)


def test_random_backbones_are_reproducible_and_leave_the_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_backbone(BackboneSpec("tiny-clip-random", "random"))
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    second = load_backbone(BackboneSpec("tiny-clip-random", "random"))
    assert torch.equal(first.clip.visual.conv1.weight, second.clip.visual.conv1.weight)
