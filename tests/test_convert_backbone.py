"""``genclip convert-backbone`` against third-party implementations.

- Hugging Face: a random transformers ``CLIPModel`` (tiny config) saved with
  ``save_pretrained`` converts, and transformers and our backbone give the same image and
  text embeddings (1e-5), for QuickGELU and GELU models: the activation is recorded in the file
  and honoured at load time.
- OpenAI: a TorchScript archive of an OpenAI-layout module tree (open_clip's CLIP modules under
  OpenAI's key names, plus the archive's ``input_resolution`` / ``context_length`` /
  ``vocab_size`` entries, partly fp16 as OpenAI's files) converts only with
  ``--trust-torchscript`` and loads to the archive's own outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from model.backbone import ClipBackbone, load_backbone
from model.conversion.openai_archive import known_openai_release
from model.errors import WeightsFormatError
from model.weights_source import BackboneSpec
from service.cli import main

# An open_clip architecture matching the tiny transformers config below (no QuickGELU in the
# config itself: the converted file must say which activation to use).
HF_TEST_MODEL = "tiny-hf-clip-test"
HF_TEST_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "head_width": 12, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module", autouse=True)
def test_model_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{HF_TEST_MODEL}.json").write_text(json.dumps(HF_TEST_CONFIG))
    open_clip.add_model_config(folder)


def hf_clip(activation: str = "quick_gelu", seed: int = 0, vision_heads: int = 4):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": activation},
        vision_config={"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2,
                       "num_attention_heads": vision_heads, "image_size": 32, "patch_size": 8, "hidden_act": activation},
        projection_dim=24,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


@torch.no_grad()
def embeddings_agree(model, backbone: ClipBackbone, atol: float = 1e-5) -> float:
    """Max difference of unit-norm image and text embeddings, transformers vs our backbone."""
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours_image = backbone.encode_image(pixels, [backbone.num_blocks]).global_embedding
    theirs_image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    texts = ["a photo of a damaged bottle.", "metal nut", "x"]
    tokens = backbone.tokenize(texts)
    ours_text = backbone.encode_texts(texts)
    theirs_text = F.normalize(model.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    return max(float((ours_image - theirs_image).abs().max()), float((ours_text - theirs_text).abs().max()))


# ---------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_hf_clip_folder_converts_and_matches_transformers(activation: str, tmp_path: Path, capsys) -> None:
    model = hf_clip(activation)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "clip.safetensors"
    assert main(["convert-backbone", str(tmp_path / "hf"), "--out", str(out), "--backbone", HF_TEST_MODEL]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["source_kind"] == "hf-transformers" and summary["backbone"] == HF_TEST_MODEL
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.float32}
    assert metadata["quick_gelu"] == ("true" if activation == "quick_gelu" else "false")
    assert metadata["format"] == "open_clip"

    previous = single_thread()
    try:
        backbone = load_backbone(BackboneSpec(HF_TEST_MODEL, str(out)))
        assert backbone.quick_gelu is (activation == "quick_gelu")
        assert embeddings_agree(model, backbone) < 1e-5
        # The recorded activation matters: forcing the other one moves the embeddings.
        forced = load_backbone(BackboneSpec(HF_TEST_MODEL, str(out), quick_gelu=activation != "quick_gelu"))
        assert forced.quick_gelu is (activation != "quick_gelu")
        assert embeddings_agree(model, forced) > 1e-3
    finally:
        torch.set_num_threads(previous)


def test_hf_pytorch_model_bin_gives_the_same_file(tmp_path: Path) -> None:
    model = hf_clip()
    model.save_pretrained(tmp_path / "hf")
    folder_bin = tmp_path / "hf_bin"
    folder_bin.mkdir()
    (folder_bin / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(model.state_dict(), folder_bin / "pytorch_model.bin")
    from model.conversion import convert_backbone
    from safetensors.torch import load_file

    convert_backbone(tmp_path / "hf", tmp_path / "a.safetensors", HF_TEST_MODEL)
    convert_backbone(folder_bin, tmp_path / "b.safetensors", HF_TEST_MODEL)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_hf_conversion_refuses_what_does_not_fit(tmp_path: Path, capsys) -> None:
    hf_clip(vision_heads=2).save_pretrained(tmp_path / "two_heads")
    code = main(["convert-backbone", str(tmp_path / "two_heads"), "--out", str(tmp_path / "x.safetensors"),
                 "--backbone", HF_TEST_MODEL])
    assert code == 2 and "vision attention heads 2 != 4" in capsys.readouterr().err
    hf_clip().save_pretrained(tmp_path / "ok")
    code = main(["convert-backbone", str(tmp_path / "ok"), "--out", str(tmp_path / "x.safetensors"),
                 "--backbone", "tiny-clip-random"])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit open_clip's tiny-clip-random" in err and "vision width 48" in err
    assert "--backbone" in err and not (tmp_path / "x.safetensors").exists()
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    config["model_type"] = "siglip"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(config))
    assert main(["convert-backbone", str(tmp_path / "ok"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "model_type 'siglip'" in capsys.readouterr().err


def test_converted_file_for_another_backbone_is_refused_at_load(tmp_path: Path) -> None:
    hf_clip().save_pretrained(tmp_path / "hf")
    from model.conversion import convert_backbone

    convert_backbone(tmp_path / "hf", tmp_path / "c.safetensors", HF_TEST_MODEL)
    with pytest.raises(WeightsFormatError, match="converted for open_clip's tiny-hf-clip-test"):
        load_backbone(BackboneSpec("ViT-B-16", str(tmp_path / "c.safetensors")))


# ---------------------------------------------------------------------- OpenAI TorchScript


class OpenAILayoutCLIP(nn.Module):
    """OpenAI's CLIP module tree (its key names are open_clip's) with the archive's extra entries."""

    def __init__(self, clip: open_clip.CLIP, image_size: int) -> None:
        super().__init__()
        self.visual = clip.visual
        self.transformer = clip.transformer
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.causal_mask = clip.attn_mask  # a plain attribute, as in OpenAI's model: not in the state dict
        self.register_buffer("input_resolution", torch.tensor(image_size))
        self.register_buffer("context_length", torch.tensor(clip.context_length))
        self.register_buffer("vocab_size", torch.tensor(clip.vocab_size))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.visual(image)
        t = self.token_embedding(text) + self.positional_embedding
        t = self.ln_final(self.transformer(t, attn_mask=self.causal_mask))
        t = t[torch.arange(t.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return x, t


def openai_archive(path: Path, fp16: bool) -> tuple[OpenAILayoutCLIP, dict[str, torch.Tensor]]:
    """Trace and save an OpenAI-layout tiny CLIP; with ``fp16`` the weights OpenAI stores in
    half precision (convolutions, linear and attention weights, projections) are halved after
    tracing, as in OpenAI's files. Returns the module and its float32 reference state dict."""
    torch.manual_seed(5)
    clip = open_clip.create_model("tiny-clip-random").eval()
    module = OpenAILayoutCLIP(clip, 64).eval()
    example = (torch.randn(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))
    traced = torch.jit.trace(module, example, check_trace=False)
    reference = {}
    for name, parameter in traced.named_parameters():
        if fp16 and (name.endswith(("proj", "in_proj_weight", "in_proj_bias")) or any(
                part in name for part in ("c_fc.", "c_proj.", "out_proj.", "conv1."))):
            parameter.data = parameter.data.half()
        reference[name] = parameter.detach().float().clone()
    torch.jit.save(traced, str(path))
    return module, reference


def test_torchscript_needs_trust_and_says_why(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "ViT-tiny.pt"
    openai_archive(archive, fp16=True)

    def never(*args, **kwargs):
        raise AssertionError("the archive must not be loaded without --trust-torchscript")

    monkeypatch.setattr(torch.jit, "load", never)
    out = tmp_path / "tiny.safetensors"
    code = main(["convert-backbone", str(archive), "--out", str(out), "--backbone", "tiny-clip-random"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "TorchScript archive" in err and "runs code stored in the file" in err and "--trust-torchscript" in err
    assert "matches no OpenAI release" in err


def test_torchscript_archive_converts_exactly_with_trust(tmp_path: Path, capsys) -> None:
    archive = tmp_path / "ViT-tiny.pt"
    _, reference = openai_archive(archive, fp16=True)
    out = tmp_path / "tiny.safetensors"
    code = main(["convert-backbone", str(archive), "--out", str(out), "--backbone", "tiny-clip-random",
                 "--trust-torchscript"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["source_kind"] == "openai-torchscript" and summary["quick_gelu"] == "true"
    from safetensors.torch import load_file

    converted = load_file(str(out))
    assert set(converted) == set(reference)  # input_resolution / context_length / vocab_size dropped
    assert all(converted[key].dtype == torch.float32 and torch.equal(converted[key], reference[key]) for key in reference)
    backbone = load_backbone(BackboneSpec("tiny-clip-random", str(out)))
    assert backbone.weights_label == str(out)
    for key, tensor in backbone.clip.state_dict().items():
        if key in reference:
            assert torch.equal(tensor, reference[key]), key


def test_torchscript_archive_loads_to_the_archives_own_outputs(tmp_path: Path) -> None:
    archive = tmp_path / "ViT-tiny-fp32.pt"
    openai_archive(archive, fp16=False)  # float32 throughout, so the archive itself can run
    out = tmp_path / "tiny.safetensors"
    assert main(["convert-backbone", str(archive), "--out", str(out), "--backbone", "tiny-clip-random",
                 "--trust-torchscript"]) == 0
    scripted = torch.jit.load(str(archive))
    backbone = load_backbone(BackboneSpec("tiny-clip-random", str(out)))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    tokens = backbone.tokenize(["a photo of a bottle.", "damaged"])
    with torch.no_grad():
        image, text = scripted(pixels, tokens)
        ours_image = backbone.encode_image(pixels, [backbone.num_blocks]).global_embedding
        ours_text = backbone.encode_texts(["a photo of a bottle.", "damaged"])
        torch.testing.assert_close(backbone.clip.encode_image(pixels), image, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_image, F.normalize(image, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_text, F.normalize(text, dim=-1), atol=1e-6, rtol=0)


def test_plain_openai_state_dict_needs_no_trust_and_code_pickles_are_refused(tmp_path: Path, capsys) -> None:
    module, _ = openai_archive(tmp_path / "unused.pt", fp16=False)
    state = {**module.state_dict()}
    plain = tmp_path / "openai_state_dict.pt"
    torch.save(state, plain)
    out = tmp_path / "plain.safetensors"
    assert main(["convert-backbone", str(plain), "--out", str(out), "--backbone", "tiny-clip-random"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source_kind"] == "openai-state-dict"

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"visual.proj": Payload()}, tmp_path / "hostile.pt")
    code = main(["convert-backbone", str(tmp_path / "hostile.pt"), "--out", str(tmp_path / "h.safetensors")])
    captured = capsys.readouterr()
    assert code == 2 and "weights_only=True" in captured.err and "ran" not in captured.out


def test_known_openai_release_is_read_from_open_clips_urls() -> None:
    assert known_openai_release("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02") == "ViT-L-14-336"
    assert known_openai_release("0" * 64) is None
