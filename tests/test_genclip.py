"""GenCLIP: trainable parameters, prompt slot layout, training on the vision-enhanced branch
only, text caching and batching, CNF, inference shapes and the fusion weights."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from PIL import Image

from model.backbone import ClipBackbone
from model.genclip import ClassNameFilter, GenCLIP, GenCLIPConfig
from model.scorer_detector import ScorerDetector


@pytest.fixture
def genclip(tiny_backbone: ClipBackbone) -> GenCLIP:
    torch.manual_seed(1)
    return GenCLIP(tiny_backbone, (1, 2, 3, 4), 64).eval()


def test_only_prompt_parameters_train(genclip: GenCLIP) -> None:
    trainable = {name for name, parameter in genclip.named_parameters() if parameter.requires_grad}
    assert trainable == {"normal_state", "abnormal_state", "query"} | {
        f"vision_prompts.{i}.{kind}" for i in range(4) for kind in ("weight", "bias")
    }
    assert not any(parameter.requires_grad for parameter in genclip.backbone.parameters())
    assert set(genclip.prompt_state_dict()) == trainable


def test_gradients_reach_prompts_not_backbone(genclip: GenCLIP) -> None:
    genclip.train()
    outputs = genclip.forward_train(torch.randn(2, 3, 64, 64), ["bottle", None])
    loss = sum(p[:, 1].mean() for p in outputs.layer_probabilities) + outputs.image_logits[:, 1].mean()
    loss.backward()
    assert genclip.query.grad is not None and genclip.query.grad.abs().sum() > 0
    assert genclip.vision_prompts[0].weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in genclip.backbone.parameters())


@pytest.mark.parametrize("size", [64, 96, 128])
def test_inspection_shapes(tiny_backbone: ClipBackbone, random_images: list[Image.Image], size: int) -> None:
    torch.manual_seed(1)
    detector = ScorerDetector(GenCLIP(tiny_backbone, (1, 2, 3, 4), size))
    results = detector.inspect(random_images, ["bottle", None, "screw"])
    assert len(results) == 3
    for image, result in zip(random_images, results):
        assert result.anomaly_map.shape == (image.height, image.width)
        assert 0.0 <= result.anomaly_map.min() and result.anomaly_map.max() <= 1.0
        assert 0.0 <= result.score <= 1.0
    assert results[1].class_label == "object"
    assert detector.identity.name == "genclip" and detector.identity.image_size == size


def test_training_outputs_shapes(genclip: GenCLIP) -> None:
    genclip.train()
    outputs = genclip.forward_train(torch.randn(3, 3, 96, 96), ["a", "b", None])
    assert len(outputs.layer_probabilities) == 4  # one vision-enhanced map per tapped layer
    assert all(p.shape == (3, 2, 96, 96) for p in outputs.layer_probabilities)
    torch.testing.assert_close(outputs.layer_probabilities[0].sum(dim=1), torch.ones(3, 96, 96))
    assert outputs.image_logits.shape == (3, 2)


def test_query_only_text_is_computed_once(genclip: GenCLIP, random_images: list[Image.Image]) -> None:
    detector = ScorerDetector(genclip)
    with mock.patch.object(genclip, "_state_slots", wraps=genclip._state_slots) as state_slots:
        detector.inspect(random_images[:1], [None])
        calls_first = state_slots.call_count
        detector.inspect(random_images[1:], [None, None])
    # first call builds both branches; later calls only the vision-enhanced branch
    assert calls_first == 2
    assert state_slots.call_count == 3
    cached = genclip.query_only_text()
    assert cached is genclip.query_only_text()


def test_query_only_cache_is_dropped_when_training(genclip: GenCLIP) -> None:
    before = genclip.query_only_text().clone()
    genclip.train()
    with torch.no_grad():
        genclip.query.add_(torch.randn_like(genclip.query))
    genclip.eval()
    assert (genclip.query_only_text() - before).abs().max() > 1e-4


def test_vision_enhanced_text_differs_per_image(genclip: GenCLIP) -> None:
    features = genclip.backbone.encode_image(torch.randn(2, 3, 64, 64), genclip.layers)
    text = genclip.vision_enhanced_text(features.layer_class_tokens, ["object", "object"])
    assert text.shape == (2, 4, 2, genclip.backbone.embed_dim)
    assert (text[0] - text[1]).abs().max() > 1e-4  # same name, different images
    assert (text[:, 0] - text[:, 1]).abs().max() > 1e-4  # different layers


def test_vision_enhanced_text_is_one_batched_pass(genclip: GenCLIP) -> None:
    features = genclip.backbone.encode_image(torch.randn(3, 3, 64, 64), genclip.layers)
    with mock.patch.object(genclip.backbone, "encode_text_embeddings", wraps=genclip.backbone.encode_text_embeddings) as encode:
        genclip.vision_enhanced_text(features.layer_class_tokens, ["bottle", "metal nut", "object"])
    assert encode.call_count == 1
    assert encode.call_args.args[0].shape[0] == 3 * 4 * 2


def test_prompt_truncation_is_exact(genclip: GenCLIP) -> None:
    """The text pass cut to the longest prompt equals the full 77-token pass."""
    backbone = genclip.backbone
    features = backbone.encode_image(torch.randn(2, 3, 64, 64), genclip.layers)
    truncated = genclip.vision_enhanced_text(features.layer_class_tokens, ["bottle", "metal nut"])
    original = backbone.end_of_text_positions
    try:
        # Force the full context by pretending every sequence ends at the last position.
        captured: dict[str, torch.Tensor] = {}
        real_encode = backbone.encode_text_embeddings

        def full_context(embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
            clip = backbone.clip
            x = embeddings + clip.positional_embedding
            x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
            pooled = x[torch.arange(x.shape[0]), eot] @ clip.text_projection
            captured["eot"] = eot
            return torch.nn.functional.normalize(pooled, dim=-1)

        backbone.encode_text_embeddings = full_context  # type: ignore[method-assign]
        full = genclip.vision_enhanced_text(features.layer_class_tokens, ["bottle", "metal nut"])
    finally:
        backbone.encode_text_embeddings = real_encode  # type: ignore[method-assign]
        backbone.end_of_text_positions = original  # type: ignore[method-assign]
    assert int(captured["eot"].max()) < 20  # the truncated pass really was much shorter than 77
    assert (truncated - full).abs().max() < 1e-5


def test_class_name_filter_rejects_gibberish_and_keeps_matching_names(tiny_backbone: ClipBackbone) -> None:
    cnf = ClassNameFilter(tiny_backbone, margin=-10.0)  # margin so low that any word-like name survives
    image = torch.nn.functional.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    labels = cnf.filter(image, ["metal_nut", None, "xq7zkvpwq3jj", "   "])
    assert labels == ["metal nut", "object", "object", "object"]
    strict = ClassNameFilter(tiny_backbone, margin=10.0)  # no name can win by a cosine of 10
    assert strict.filter(image[:1], ["bottle"]) == ["object"]


def test_class_name_filter_uses_image_similarity(tiny_backbone: ClipBackbone) -> None:
    cnf = ClassNameFilter(tiny_backbone, margin=0.0)
    name_feature = tiny_backbone.encode_texts(["a photo of a bottle."])
    generic = tiny_backbone.encode_texts(["a photo of an object."])
    # An image embedding equal to the name's text feature must keep the name,
    # one equal to the generic prompt's feature must fall back to "object".
    assert cnf.filter(name_feature, ["bottle"]) == ["bottle"]
    assert cnf.filter(generic, ["bottle"]) == ["object"]


def test_config_controls_prompt_sizes(tiny_backbone: ClipBackbone) -> None:
    model = GenCLIP(tiny_backbone, (2, 4), 64, GenCLIPConfig(state_tokens=2, query_tokens=3, vision_tokens=2))
    assert model.query.shape == (3, tiny_backbone.text_width)
    assert model.vision_prompts[0].out_features == 2 * tiny_backbone.text_width
    metadata = model.checkpoint_metadata()
    assert metadata["detector_config"] == {
        "state_tokens": 2, "query_tokens": 3, "vision_tokens": 2, "smoothing_sigma": 4.0, "cnf_margin": 0.0,
        "enhanced_weight": 0.5, "global_score_weight": 0.5,
    }
    assert metadata["profile"] == "genclip"
    assert {"token_counts", "fusion", "image_score"} <= set(metadata["our_reading"])


# ---------------------------------------------------------------------- prompt slot layout


def test_prompt_layout_replaces_the_right_slots(tiny_backbone: ClipBackbone) -> None:
    config = GenCLIPConfig(state_tokens=2, query_tokens=3, vision_tokens=2)
    torch.manual_seed(2)
    model = GenCLIP(tiny_backbone, (1, 2, 3, 4), 64, config).eval()
    features = tiny_backbone.encode_image(torch.randn(2, 3, 64, 64), model.layers)
    sequences, eot = model.vision_enhanced_embeddings(features.layer_class_tokens, ["metal nut", "object"])
    width = tiny_backbone.text_width
    assert sequences.shape == (2, 4, 2, 77, width)
    # [SOT] [N_p/A_p x 2] [Q_P x 3] [MVP_i x 2] <name> . EOT: slots 1-2, 3-5, 6-7, name from 8.
    name_tokens = tiny_backbone.tokenize(["X X X X X X X metal nut.", "X X X X X X X object."])
    frozen = tiny_backbone.embed_tokens(name_tokens)
    assert eot.tolist() == tiny_backbone.end_of_text_positions(name_tokens).tolist() == [11, 10]
    for image in range(2):
        for layer in range(4):
            mvp = model.vision_prompts[layer](features.layer_class_tokens[layer][image]).view(2, width)
            for prompt, state in enumerate((model.normal_state, model.abnormal_state)):
                row = sequences[image, layer, prompt]
                assert torch.equal(row[0], frozen[image, 0])  # start of text
                assert torch.equal(row[1:3], state)  # N_p / A_p
                assert torch.equal(row[3:6], model.query)  # Q_P, shared
                torch.testing.assert_close(row[6:8], mvp)  # MVP_i of this image and layer
                assert torch.equal(row[8:], frozen[image, 8:])  # name, ".", EOT, padding
    query_sequences, query_eot = model.query_only_embeddings()
    object_tokens = tiny_backbone.tokenize(["X X X X X object."])
    object_rows = tiny_backbone.embed_tokens(object_tokens)[0]
    assert query_eot.tolist() == [8, 8]
    for prompt, state in enumerate((model.normal_state, model.abnormal_state)):
        row = query_sequences[prompt]  # [SOT] [N_p/A_p] [Q_P] object . EOT: no MVP slot
        assert torch.equal(row[0], object_rows[0])
        assert torch.equal(row[1:3], state)
        assert torch.equal(row[3:6], model.query)
        assert torch.equal(row[6:], object_rows[6:])


# ---------------------------------------------------------------------- the two branches


def test_training_uses_the_vision_enhanced_branch_only(genclip: GenCLIP) -> None:
    genclip.train()
    with mock.patch.object(genclip, "query_only_text", wraps=genclip.query_only_text) as query_only:
        outputs = genclip.forward_train(torch.randn(2, 3, 64, 64), ["bottle", None])
    assert query_only.call_count == 0  # F_Q takes no part in training
    loss = sum(p[:, 1].mean() for p in outputs.layer_probabilities) + outputs.image_logits[:, 1].mean()
    loss.backward()
    for name in ("normal_state", "abnormal_state", "query"):  # the GQPs learn through the enhanced branch
        assert getattr(genclip, name).grad.abs().sum() > 0, name


def test_query_only_branch_joins_at_inference_with_its_weight(tiny_backbone: ClipBackbone) -> None:
    torch.manual_seed(1)
    reference = GenCLIP(tiny_backbone, (1, 2, 3, 4), 64).eval()
    features = tiny_backbone.encode_image(torch.randn(2, 3, 64, 64), reference.layers)

    def scores_with(**weights: float) -> torch.Tensor:
        model = GenCLIP(tiny_backbone, (1, 2, 3, 4), 64, GenCLIPConfig(**weights)).eval()
        model.load_state_dict(reference.state_dict())
        return model.score_features(features, ["bottle", None])

    fused = scores_with(enhanced_weight=0.5)
    enhanced_only = scores_with(enhanced_weight=1.0)
    query_only = scores_with(enhanced_weight=0.0)
    torch.testing.assert_close(fused.maps, torch.clamp(0.5 * enhanced_only.maps + 0.5 * query_only.maps, 0, 1), atol=1e-6, rtol=0)
    assert (fused.maps - enhanced_only.maps).abs().max() > 1e-4  # the query-only branch does count
    peak_only = scores_with(global_score_weight=0.0)
    torch.testing.assert_close(peak_only.scores, fused.maps.flatten(1).amax(dim=1), atol=1e-6, rtol=0)
