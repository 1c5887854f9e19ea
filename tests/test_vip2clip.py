"""ViP2-CLIP on the tiny random CLIP: shapes, trainable set, prompt layout, FGP, the top-k
image rule on a hand-made example, a training step, the service interface, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.anomaly_maps import TEMPERATURE
from model.backbone import ClipBackbone, load_backbone
from model.checkpoint import backbone_metadata, save_checkpoint
from model.factory import DetectorConfig, build_detector
from model.scorer_detector import ScorerDetector
from model.vip2clip import FGP, VIP2CLIP, VIP2CLIPConfig, topk_image_logits
from model.weights_source import BackboneSpec

TINY = BackboneSpec("tiny-clip-random", "random")
LAYERS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return load_backbone(TINY)


def make_scorer(backbone: ClipBackbone, image_size: int = 64, config: VIP2CLIPConfig = VIP2CLIPConfig(), seed: int = 1) -> VIP2CLIP:
    torch.manual_seed(seed)
    return VIP2CLIP(backbone, LAYERS, image_size, config)


def defect_batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two normalised images: a textured background, the first with a bright square defect."""
    generator = torch.Generator().manual_seed(3)
    base = 0.4 + 0.05 * torch.randn(2, 3, size, size, generator=generator)
    mask = torch.zeros(2, size, size)
    lo, hi = size // 4, size // 4 + size // 4
    base[0, :, lo:hi, lo:hi] = 1.0
    mask[0, lo:hi, lo:hi] = 1.0
    pixels = (base - 0.45) / 0.27
    return pixels, mask, torch.tensor([1, 0])


# ---------------------------------------------------------------------- shapes, parameters


@pytest.mark.parametrize("size", [64, 96, 128])
def test_shapes_at_several_sizes(backbone: ClipBackbone, size: int) -> None:
    scorer = make_scorer(backbone, image_size=size)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        result = scorer.score_pixels(pixels, ["bottle", None])
        train = scorer.forward_train(pixels, ["bottle", None])
    assert result.maps.shape == (2, size, size)
    assert result.scores.shape == (2,)
    assert float(result.maps.min()) >= 0.0 and float(result.maps.max()) <= 1.0
    assert float(result.scores.min()) >= 0.0 and float(result.scores.max()) <= 1.0
    assert result.class_labels == ["object", "object"]
    assert len(train.layer_probabilities) == len(LAYERS)
    for probabilities in train.layer_probabilities:
        assert probabilities.shape == (2, 2, size, size)
        assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, size, size), atol=1e-5)
    assert train.image_logits.shape == (2, 2)


def test_only_prompt_learner_and_fgp_require_grad(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone)
    trainable = {name for name, parameter in scorer.named_parameters() if parameter.requires_grad}
    assert trainable
    assert all(name.startswith(("prompt_learner.", "fgp.")) for name in trainable)
    assert not any(parameter.requires_grad for parameter in backbone.parameters())
    expected = {f"prompt_learner.{name}" for name, _ in scorer.prompt_learner.named_parameters()}
    expected |= {f"fgp.{name}" for name, _ in scorer.fgp.named_parameters()}
    assert trainable == expected == set(scorer.prompt_state_dict())
    groups = scorer.parameter_groups(1e-3)
    assert [group["lr"] for group in groups] == [1e-3, 1e-5]  # FGP at lr / 100, as the published code
    assert [group["lr"] for group in scorer.parameter_groups(2e-2)] == [2e-2, 2e-4]  # --lr reaches both
    assert sum(len(group["params"]) for group in groups) == len(trainable)
    assert scorer.checkpoint_metadata()["detector_config"] == {
        "context_tokens": 7, "class_slots": 3, "fgp_heads": 8, "top_k": 50, "smoothing_sigma": 8.0,
        "global_embedding": "ln_post", "prompt_rows": "tokenized", "full_stop": True, "smoothing_border": "mirror",
    }
    assert scorer.profile == "vip2clip"


def test_training_optimizer_takes_the_groups_for_the_learning_rate(backbone: ClipBackbone) -> None:
    from model.baseline import PromptEnsembleScorer
    from model.training import build_optimizer

    optimizer = build_optimizer(make_scorer(backbone), 2e-2)
    assert [group["lr"] for group in optimizer.param_groups] == [2e-2, 2e-4]  # --lr reaches ViP2-CLIP
    with pytest.raises(TypeError, match="not a TrainableScorer"):
        build_optimizer(PromptEnsembleScorer(backbone, LAYERS, 64), 1e-3)  # type: ignore[arg-type]


def test_fgp_heads_must_divide_embed_dim(backbone: ClipBackbone) -> None:
    with pytest.raises(ValueError, match="divisible"):
        VIP2CLIP(backbone, LAYERS, 64, VIP2CLIPConfig(fgp_heads=7))


# ---------------------------------------------------------------------- ViP-Prompt


def test_prompt_layout_replaces_the_right_slots(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone)
    learner = scorer.prompt_learner
    assert learner.templates == ("X X X X X X X good X X X.", "X X X X X X X damaged X X X.")
    global_embedding = torch.nn.functional.normalize(torch.randn(2, backbone.embed_dim), dim=-1)
    sequences = learner.prompt_embeddings(global_embedding)  # (B, 2, L, W)
    tokens = backbone.tokenize(list(learner.templates))
    frozen = backbone.embed_tokens(tokens)
    eot = int(backbone.end_of_text_positions(tokens)[0])
    assert sequences.shape == (2, 2, eot + 1, backbone.text_width)
    slots = learner.class_slot_vectors(global_embedding)
    # K_j = cls_ctx_j + MLP_j(global) + bias (the bias is added after the MLP, as published)
    for j, mlp in enumerate(learner.slot_mlps):
        torch.testing.assert_close(slots[:, j], learner.class_slots[j] + mlp(global_embedding) + learner.slot_bias)
    for prompt, context in enumerate((learner.normal_context, learner.abnormal_context)):
        for image in range(2):
            row = sequences[image, prompt]
            assert torch.equal(row[0], frozen[prompt, 0])  # start of text
            assert torch.equal(row[1:8], context)  # learned context
            assert torch.equal(row[8], frozen[prompt, 8])  # "good" / "damaged"
            assert torch.equal(row[9:12], slots[image])  # image-conditioned class slots
            assert torch.equal(row[12:], frozen[prompt, 12 : eot + 1])  # "." and end of text
    # The two prompts' context vectors are separate; the class slots are shared.
    assert not torch.equal(sequences[0, 0, 1:8], sequences[0, 1, 1:8])
    assert torch.equal(sequences[0, 0, 9:12], sequences[0, 1, 9:12])


def test_class_slot_shift_depends_on_the_image(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        global_embedding = backbone.encode_image(pixels, LAYERS).global_embedding
        text = scorer.text_features(global_embedding)
        again = scorer.text_features(global_embedding[:1])
    assert text.shape == (2, 2, backbone.embed_dim)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    assert not torch.allclose(text[0], text[1], atol=1e-4)  # different images, different text
    assert torch.allclose(again[0], text[0], atol=1e-5)  # batching does not mix images


def test_text_pass_is_one_batched_call(backbone: ClipBackbone, monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = make_scorer(backbone)
    calls: list[tuple[int, ...]] = []
    original = backbone.encode_text_embeddings

    def spy(embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(embeddings.shape))
        return original(embeddings, eot)

    monkeypatch.setattr(backbone, "encode_text_embeddings", spy)
    with torch.no_grad():
        scorer.score_pixels(torch.randn(3, 3, 64, 64), [None] * 3)
    assert calls == [(6, 14, backbone.text_width)]  # B x 2 sequences, cut after the EOT


# ---------------------------------------------------------------------- FGP


def test_fgp_output_is_unit_norm_and_matches_explicit_attention() -> None:
    torch.manual_seed(0)
    fgp = FGP(16, 16, 16, heads=4)
    text = torch.nn.functional.normalize(torch.randn(3, 2, 16), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(3, 10, 16), dim=-1)
    out = fgp(text, patches)
    assert out.shape == (3, 2, 16)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 2), atol=1e-5)
    # Explicit Conv1d version: (B, C, T) layout, 4 heads of 4, unscaled logits, softmax over patches.
    q = fgp.q_proj(text.transpose(1, 2)).transpose(1, 2).reshape(3, 2, 4, 4)
    k = fgp.k_proj(patches.transpose(1, 2)).transpose(1, 2).reshape(3, 10, 4, 4)
    v = fgp.v_proj(patches.transpose(1, 2)).transpose(1, 2).reshape(3, 10, 4, 4)
    attention = torch.einsum("bthc,bnhc->bhtn", q, k).softmax(dim=-1)
    mixed = torch.einsum("bhtn,bnhc->bthc", attention, v).reshape(3, 2, 16)
    expected = fgp.out_proj(mixed.transpose(1, 2)).transpose(1, 2)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(out, expected, atol=1e-5)


def test_refined_text_is_unit_norm_per_layer(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone)
    with torch.no_grad():
        features = backbone.encode_image(torch.randn(2, 3, 64, 64), LAYERS)
        refined = scorer.refined_text(features.patch_tokens, scorer.text_features(features.global_embedding))
    assert refined.shape == (len(LAYERS), 2, 2, backbone.embed_dim)
    assert torch.allclose(refined.norm(dim=-1), torch.ones(len(LAYERS), 2, 2), atol=1e-5)
    assert not torch.allclose(refined[0], refined[-1], atol=1e-4)  # each layer refines on its own patches


# ---------------------------------------------------------------------- top-k image rule


def test_topk_image_logits_hand_made_example() -> None:
    # Two layers, three 2-D unit patches each, B = 2 (image 1 = image 0 with patches permuted).
    layer_1 = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    layer_2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    patches = [torch.stack([layer_1, layer_1[[2, 0, 1]]]), torch.stack([layer_2, layer_2[[1, 2, 0]]])]
    text_1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [normal, abnormal]
    text_2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swapped in layer 2
    texts = [text_1.expand(2, -1, -1), text_2.expand(2, -1, -1)]
    # k = 2. Layer 1 cosines [normal, abnormal]: [1, 0], [.6, .8], [.8, .6]; the two most abnormal
    # are [.6, .8] and [.8, .6]. Layer 2: [0, 1], [1, 0], [.8, .6]; the two most abnormal are
    # [0, 1] and [.8, .6]. Mean of the four: normal 2.2 / 4 = .55, abnormal 3.0 / 4 = .75.
    logits = topk_image_logits(patches, texts, k=2)
    expected = torch.tensor([0.55, 0.75]) / 0.07
    assert torch.allclose(logits, expected.expand(2, -1), atol=1e-5)
    p_abnormal = logits.softmax(dim=-1)[:, 1]
    assert p_abnormal[0].item() == pytest.approx(1.0 / (1.0 + math.exp(-0.2 / 0.07)), rel=1e-5)
    # k above N keeps every patch: normal (2.4 + 1.8) / 6 = .7, abnormal (1.4 + 1.6) / 6 = .5.
    everything = topk_image_logits(patches, texts, k=50)
    assert torch.allclose(everything, (torch.tensor([0.7, 0.5]) / TEMPERATURE).expand(2, -1), atol=1e-5)


def test_image_score_is_the_topk_rule(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone, config=VIP2CLIPConfig(top_k=5))
    with torch.no_grad():
        features = backbone.encode_image(torch.randn(2, 3, 64, 64), LAYERS)
        result = scorer.score_features(features, [None, None])
        refined = scorer.refined_text(features.patch_tokens, scorer.text_features(features.global_embedding))
        logits = topk_image_logits(features.patch_tokens, list(refined), k=5)
    assert torch.allclose(result.scores, logits.softmax(dim=-1)[:, 1], atol=1e-6)


def test_batch_equals_single_images(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = scorer.score_pixels(pixels, [None, None])
        first = scorer.score_pixels(pixels[:1], [None])
    assert torch.allclose(both.maps[0], first.maps[0], atol=1e-5)
    assert torch.allclose(both.scores[:1], first.scores, atol=1e-5)


# ---------------------------------------------------------------------- training


def _loss(outputs, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from model.losses import image_loss, segmentation_loss

    return segmentation_loss(outputs.layer_probabilities, mask, torch.ones(2, dtype=torch.bool)) + image_loss(
        outputs.image_logits, labels
    )


def test_gradients_reach_prompts_and_fgp_only(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone).train()
    pixels, mask, labels = defect_batch()
    _loss(scorer.forward_train(pixels, [None, None]), mask, labels).backward()
    for name, parameter in scorer.named_parameters():
        if name.startswith(("prompt_learner.", "fgp.")):
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_adam_steps_lower_the_loss(backbone: ClipBackbone) -> None:
    scorer = make_scorer(backbone).train()
    pixels, mask, labels = defect_batch()
    optimizer = torch.optim.Adam(scorer.parameter_groups(1e-3))
    losses = []
    for _ in range(8):
        loss = _loss(scorer.forward_train(pixels, [None, None]), mask, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < losses[0] - 0.01, losses
    assert not any(parameter.grad is not None for parameter in backbone.parameters())


# ---------------------------------------------------------------------- service, checkpoints


def test_service_interface_end_to_end(backbone: ClipBackbone) -> None:
    detector = ScorerDetector(make_scorer(backbone))
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (70, 50), dtype=np.uint8)),  # grey, portrait
    ]
    inspections = detector.inspect(images, ["screw", None])
    assert detector.identity.name == "vip2clip"
    assert [inspection.anomaly_map.shape for inspection in inspections] == [(48, 80), (70, 50)]
    for inspection in inspections:
        assert inspection.class_label == "object"
        assert 0.0 <= inspection.score <= 1.0
        assert inspection.anomaly_map.dtype == np.float32
        assert 0.0 <= inspection.anomaly_map.min() <= inspection.anomaly_map.max() <= 1.0


def test_checkpoint_round_trip_gives_identical_scores(tmp_path) -> None:
    torch.manual_seed(0)
    backbone = load_backbone(TINY)
    config = VIP2CLIPConfig(context_tokens=4, class_slots=2, fgp_heads=4)
    scorer = make_scorer(backbone, config=config, seed=5)
    metadata = {**scorer.checkpoint_metadata(), **backbone_metadata(backbone)}
    path = tmp_path / "vip2clip.safetensors"
    digest = save_checkpoint(path, scorer.prompt_state_dict(), metadata)

    torch.manual_seed(0)  # the tiny backbone is random: rebuild the same one
    detector = build_detector(DetectorConfig(detector="vip2clip", backbone=TINY, vip2clip_checkpoint=path, device="cpu"))
    loaded = detector.scorer
    assert isinstance(loaded, VIP2CLIP)
    assert loaded.config == config and loaded.profile == "vip2clip"
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, loaded.backbone.state_dict()[name]), name
    assert detector.identity.checkpoint == digest

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    expected = ScorerDetector(scorer).inspect(images)
    actual = detector.inspect(images)
    for want, got in zip(expected, actual):
        assert got.score == pytest.approx(want.score, abs=1e-6)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, atol=1e-6)
        assert got.class_label == "object"

