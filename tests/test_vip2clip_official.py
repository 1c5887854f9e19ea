"""The published ViP2-CLIP checkpoints: import, exact reproduction of the published inference,
refusal of malformed files, and the same factory path for predict and the service.

The official-format file is built here from the project's modules (a ViP2-CLIP scorer's
random prompt tensors, the tiny backbone's token embedding), with the exact key names, shapes
and dtypes of ``../shared/reference/vip2clip-official-checkpoint.md``, scaled to the tiny
backbone's widths, and saved with ``torch.save``. :func:`published_inference` is an
independent implementation of the published behaviours 1-7 of that reference, written from
the reference and open_clip's modules only (no code of ``model.vip2clip``); each behaviour
can be dropped one at a time (``drop=N``) to show that the detector's output depends on it.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from model.backbone import ClipBackbone
from model.checkpoint_import import import_official_checkpoint
from model.errors import CheckpointError
from model.factory import DetectorConfig, build_detector
from model.vip2clip import VIP2CLIP, VIP2CLIPConfig
from model.vip2clip.official import OfficialLayout, validate_official_checkpoint
from model.weights_source import BackboneSpec
from service.cli import main

TINY = BackboneSpec("tiny-clip-random", "random")
TINY_FLAGS = ["--backbone", "tiny-clip-random", "--backbone-weights", "random", "--device", "cpu"]
LAYERS = (1, 2, 3, 4)  # the tiny backbone's quarter points (ViT-L: 6, 12, 18, 24)
IMAGE_SIZE = 128  # not the tiny backbone's native 64: the positional embedding is resized
SIGMA = 8.0 * IMAGE_SIZE / 518  # sigma 8 at 518 px, scaled
TOP_K = 50
TEMPERATURE = 0.07
ABNORMAL_TEMPLATE = "X X X X X X X damaged X X X"  # no full stop; the published code used its ids for both prompts


# ---------------------------------------------------------------------- the official file


def official_state(backbone: ClipBackbone, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A published-format checkpoint for ``backbone``, from the project's modules.

    The prompt vectors and MLPs are a ViP2-CLIP scorer's (random) parameters, made larger so
    that every behaviour moves the output measurably; the frozen rows are the backbone's token
    embedding of the *abnormal* template for both prompts, as the published code stored them.
    """
    torch.manual_seed(seed)
    scorer = VIP2CLIP(backbone, LAYERS, IMAGE_SIZE)
    learner, fgp = scorer.prompt_learner, scorer.fgp
    tokens = backbone.tokenize([ABNORMAL_TEMPLATE]).to(torch.int32)
    rows = backbone.embed_tokens(tokens.long()).detach()
    width = backbone.text_width
    prompt = {
        "ctx_pos": learner.normal_context.detach() * 20,
        "ctx_neg": learner.abnormal_context.detach() * 20,
        "cls_ctx": learner.class_slots.detach() * 20,
        "cls_prompter.bias": torch.randn(1, width) * 0.5,
    }
    for j, mlp in enumerate(learner.slot_mlps):
        for index in (0, 2):
            prompt[f"cls_prompter.fc.{j}.{index}.weight"] = mlp[index].weight.detach() * 10
            prompt[f"cls_prompter.fc.{j}.{index}.bias"] = mlp[index].bias.detach()
    for suffix in ("pos", "neg"):
        prompt[f"token_prefix_{suffix}"] = rows[:, :1].clone()
        prompt[f"token_middle_{suffix}"] = rows[:, 8:9].clone()  # "damaged", in both prompts
        prompt[f"token_suffix_{suffix}"] = rows[:, 12:].clone()
        prompt[f"tokenized_prompts_{suffix}"] = tokens.clone()
    zero_try = {"prompt_temp_l1": torch.tensor(0.07)}
    fgp_modules = {"q_proj_pre": (fgp.q_proj, 20), "k_proj_pre_1": (fgp.k_proj, 20), "v_proj_pre_1": (fgp.v_proj, 4),
                   "proj_post_t": (fgp.out_proj, 4)}  # sharp attention: normal and abnormal text differ clearly
    for published, (module, scale) in fgp_modules.items():
        zero_try[f"{published}.weight"] = module.weight.detach() * scale
        zero_try[f"{published}.bias"] = module.bias.detach()
    return {"prompt_learner": {k: v.float().contiguous() if v.is_floating_point() else v for k, v in prompt.items()},
            "Zero_try": {k: v.float().contiguous() for k, v in zero_try.items()}}


@pytest.fixture(scope="module")
def state(tiny_backbone: ClipBackbone) -> dict[str, dict[str, torch.Tensor]]:
    return official_state(tiny_backbone)


@pytest.fixture(scope="module")
def official_file(state: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("official") / "visa_train_epoch_10.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def imported(official_file: Path, tiny_backbone: ClipBackbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("weights") / "vip2clip_official.safetensors"
    import_official_checkpoint(official_file, tiny_backbone, output, image_size=IMAGE_SIZE)
    return output


@pytest.fixture(scope="module")
def detector(imported: Path):
    return build_detector(DetectorConfig(detector="vip2clip", backbone=TINY, vip2clip_checkpoint=imported, device="cpu"))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    images = 0.45 + 0.25 * torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    images[0, :, 40:70, 50:90] += 1.5  # a bright "defect"
    return images


# ---------------------------------------------------------------------- independent reference


def _mlp(x: torch.Tensor, prompt: dict, j: int) -> torch.Tensor:
    hidden = F.relu(F.linear(x, prompt[f"cls_prompter.fc.{j}.0.weight"], prompt[f"cls_prompter.fc.{j}.0.bias"]))
    return F.linear(hidden, prompt[f"cls_prompter.fc.{j}.2.weight"], prompt[f"cls_prompter.fc.{j}.2.bias"])


@torch.no_grad()
def published_inference(
    state: dict, backbone: ClipBackbone, pixels: torch.Tensor, drop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Maps (B, S, S) and scores (B,) by the published inference (reference items 1-7).

    ``drop=N`` replaces behaviour N by the usual clean reading: 1 ``ln_post`` on the global
    embedding; 2 a freshly embedded "good" in the normal prompt; 3 a full stop before the
    end-of-text; 4 mirror borders (torch's "reflect"); 5 positional embedding resized
    bicubically; 6 FGP logits scaled by 1/sqrt(head dim); 7 the image score as the peak of
    the smoothed map instead of the top-50 cosine rule.
    """
    clip, visual = backbone.clip, backbone.clip.visual
    prompt, fgp = state["prompt_learner"], state["Zero_try"]
    batch = pixels.shape[0]
    # 5: an unmodified ViT, positional embedding resized bilinearly at run time.
    x = visual.conv1(pixels)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    native = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
    grid_pos = visual.positional_embedding[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=grid, mode="bicubic" if drop == 5 else "bilinear", align_corners=False)
    positions = torch.cat([visual.positional_embedding[:1], grid_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(batch, -1, -1), x], dim=1) + positions
    x = visual.ln_pre(x)
    patches = []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        x = block(x)
        if index in LAYERS:
            patches.append(F.normalize(visual.ln_post(x[:, 1:]) @ visual.proj, dim=-1))
    # 1: the global embedding is the final class token projected *without* ln_post.
    final = visual.ln_post(x[:, 0]) if drop == 1 else x[:, 0]
    global_embedding = F.normalize(final @ visual.proj, dim=-1)
    # ViP-Prompt: [prefix] [ctx x 7] [middle] [cls_ctx + MLP_j(g) + bias] [suffix], all 77 rows.
    slots = prompt["cls_ctx"][None] + torch.stack([_mlp(global_embedding, prompt, j) for j in range(3)], 1)
    slots = slots + prompt["cls_prompter.bias"]
    texts = []
    for suffix in ("pos", "neg"):
        middle, rest, ids = prompt[f"token_middle_{suffix}"], prompt[f"token_suffix_{suffix}"], prompt[f"tokenized_prompts_{suffix}"]
        if drop == 2 and suffix == "pos":  # 2: the stored "damaged" row replaced by a fresh "good"
            middle = clip.token_embedding(backbone.tokenize([ABNORMAL_TEMPLATE.replace("damaged", "good")]))[:, 8:9]
        if drop == 3:  # 3: with a full stop the end-of-text moves to 13
            ids = backbone.tokenize([ABNORMAL_TEMPLATE + "."])
            rest = clip.token_embedding(ids)[:, 12:]
        sequence = torch.cat(
            [prompt[f"token_prefix_{suffix}"].expand(batch, -1, -1), prompt[f"ctx_{suffix}"].expand(batch, -1, -1),
             middle.expand(batch, -1, -1), slots, rest.expand(batch, -1, -1)], dim=1,
        )
        hidden = clip.ln_final(clip.transformer(sequence + clip.positional_embedding, attn_mask=clip.attn_mask))
        pooled = hidden[:, int(ids.argmax(dim=-1))] @ clip.text_projection
        texts.append(F.normalize(pooled, dim=-1))
    text = torch.stack(texts, dim=1)  # (B, 2, D)

    def conv(x_: torch.Tensor, name: str) -> torch.Tensor:  # 1x1 Conv1d on (B, C, T)
        return F.conv1d(x_, fgp[f"{name}.weight"], fgp[f"{name}.bias"])

    maps, selected = [], []
    for layer_patches in patches:
        # 6: FGP, 8 heads, unscaled logits, softmax over patches, no residual, L2-normalised.
        q = conv(text.transpose(1, 2), "q_proj_pre")  # (B, D, 2)
        k = conv(layer_patches.transpose(1, 2), "k_proj_pre_1")  # (B, D, N)
        v = conv(layer_patches.transpose(1, 2), "v_proj_pre_1")
        dim = q.shape[1]
        head = dim // 8
        q, k, v = (t.reshape(batch, 8, head, -1) for t in (q, k, v))
        logits = torch.einsum("bhct,bhcn->bhtn", q, k)
        if drop == 6:
            logits = logits / head**0.5
        mixed = torch.einsum("bhtn,bhcn->bhct", logits.softmax(dim=-1), v).reshape(batch, dim, 2)
        refined = F.normalize(conv(mixed, "proj_post_t").transpose(1, 2), dim=-1)  # (B, 2, D)
        # 7: per layer map and the top-k patches' cosines.
        cosines = layer_patches @ refined.transpose(1, 2)  # (B, N, 2)
        probabilities = (cosines / TEMPERATURE).softmax(dim=-1)
        anomaly = ((probabilities[..., 1] + 1 - probabilities[..., 0]) / 2).reshape(batch, 1, *grid)
        maps.append(F.interpolate(anomaly, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[:, 0])
        top = probabilities[..., 1].topk(TOP_K, dim=-1).indices
        selected.append(cosines.gather(1, top.unsqueeze(-1).expand(-1, -1, 2)))
    mean_map = torch.stack(maps).mean(dim=0).double().numpy()
    # 4: scipy's gaussian_filter, default mode "reflect" (half-sample symmetric), sigma 8 at 518.
    mode = "mirror" if drop == 4 else "reflect"
    smoothed = np.stack([ndimage.gaussian_filter(m, SIGMA, mode=mode, truncate=4.0) for m in mean_map])
    gathered = torch.cat(selected, dim=1).mean(dim=1)  # (B, 2): L x 50 patches, concatenated, averaged
    scores = (gathered / TEMPERATURE).softmax(dim=-1)[:, 1].double().numpy()
    if drop == 7:
        scores = smoothed.reshape(batch, -1).max(axis=1)
    return smoothed, scores


def ours(detector, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        result = detector.scorer.score_pixels(pixels, [None] * pixels.shape[0])
    return result.maps.double().numpy(), result.scores.double().numpy()


@pytest.fixture(scope="module")
def our_output(detector, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return ours(detector, pixels)


# ---------------------------------------------------------------------- reproduction


def test_imported_detector_reproduces_the_published_inference(detector, state, pixels, tiny_backbone, our_output) -> None:
    assert detector.identity.name == "vip2clip" and detector.scorer.profile == "vip2clip-official"
    assert detector.identity.image_size == IMAGE_SIZE and detector.identity.layers == LAYERS
    maps, scores = our_output
    want_maps, want_scores = published_inference(state, tiny_backbone, pixels)
    np.testing.assert_allclose(maps, want_maps, atol=2e-6, rtol=0)
    np.testing.assert_allclose(scores, want_scores, atol=2e-6, rtol=0)
    assert np.ptp(want_scores) > 1e-3 and want_maps.std() > 1e-3  # not a degenerate comparison


def test_inspect_through_the_detector_interface_gives_the_same_maps(detector, state, pixels, tiny_backbone) -> None:
    """PIL in, the service's code path: the same figures at the image's own 128 px."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    raw = (pixels * std + mean).clamp(0, 1)
    images = [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for image in raw]
    quantised = (torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255 - mean) / std
    want_maps, want_scores = published_inference(state, tiny_backbone, quantised)
    results = detector.inspect(images)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), want_maps, atol=2e-6, rtol=0)
    np.testing.assert_allclose([r.score for r in results], want_scores, atol=2e-6, rtol=0)
    assert [r.class_label for r in results] == ["object"] * 3


BEHAVIOURS = {
    1: "global embedding without ln_post",
    2: "stored token rows used as they are ('damaged' in the normal prompt)",
    3: "no full stop",
    4: "half-sample-symmetric borders",
    5: "bilinear run-time positional embedding",
    6: "unscaled FGP logits",
    7: "top-50 cosine image score",
}


@pytest.mark.parametrize("item", sorted(BEHAVIOURS))
def test_each_published_behaviour_matters(item: int, state, pixels, tiny_backbone, our_output) -> None:
    """Dropping behaviour ``item`` from the reference moves its output away from the detector's.

    With the reproduction test above, this means: were the detector to drop that behaviour,
    its output would no longer match the published inference.
    """
    maps, scores = our_output
    dropped_maps, dropped_scores = published_inference(state, tiny_backbone, pixels, drop=item)
    difference = max(np.abs(maps - dropped_maps).max(), np.abs(scores - dropped_scores).max())
    assert difference > 1e-4, f"behaviour {item} ({BEHAVIOURS[item]}) changes nothing measurable: {difference:.2e}"


def test_item_1_global_embedding_is_the_final_class_token_projected_without_ln_post(detector, tiny_backbone, pixels) -> None:
    scorer = detector.scorer
    with torch.no_grad():
        features = tiny_backbone.encode_image(pixels, LAYERS)
        used = scorer.global_embedding(features)
    visual = tiny_backbone.clip.visual
    torch.testing.assert_close(used, F.normalize(features.final_class_token @ visual.proj, dim=-1))
    assert (used - features.global_embedding).abs().max() > 1e-3  # not the ln_post one


def test_items_2_and_3_stored_rows_no_full_stop(detector, state, tiny_backbone) -> None:
    learner = detector.scorer.prompt_learner
    prompt = state["prompt_learner"]
    for suffix in ("pos", "neg"):
        for row in ("token_prefix", "token_middle", "token_suffix"):
            assert torch.equal(getattr(learner, f"{row}_{suffix}"), prompt[f"{row}_{suffix}"]), (row, suffix)
    damaged = tiny_backbone.embed_tokens(tiny_backbone.tokenize(["damaged"]))[0, 1]
    assert torch.equal(learner.token_middle_pos[0, 0], damaged)  # the normal prompt says "damaged"
    assert learner.end_of_text_positions().tolist() == [12, 12]  # no full stop
    global_embedding = F.normalize(torch.randn(2, tiny_backbone.embed_dim), dim=-1)
    sequences = learner.prompt_embeddings(global_embedding)
    assert sequences.shape == (2, 2, 13, tiny_backbone.text_width)  # cut after the end-of-text
    assert torch.equal(sequences[:, 0, 8], damaged.expand(2, -1))


def test_item_4_smoothing_is_scipy_reflect() -> None:
    from model.anomaly_maps import gaussian_smooth

    rng = np.random.default_rng(0)
    for shape, sigma in (((2, 64, 64), 0.99), ((1, 518, 518), 8.0), ((1, 9, 12), 8.0)):  # radius 32 > 9 px too
        maps = rng.random(shape)
        want = np.stack([ndimage.gaussian_filter(m, sigma) for m in maps])  # scipy's default mode
        got = gaussian_smooth(torch.from_numpy(maps), sigma, border="symmetric").numpy()
        np.testing.assert_allclose(got, want, atol=1e-12, rtol=0)
        if min(shape[1:]) > 4 * sigma:  # the default (mirror) border differs, at the borders only
            mirror = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
            radius = int(4 * sigma + 0.5)
            assert np.abs(mirror - want).max() > 1e-4
            np.testing.assert_allclose(mirror[:, radius:-radius, radius:-radius], want[:, radius:-radius, radius:-radius], atol=1e-12)


def test_sidecar_records_profile_config_and_source(imported: Path, official_file: Path) -> None:
    sidecar = json.loads(imported.with_suffix(".json").read_text())
    assert sidecar["format_version"] == 2 and sidecar["detector"] == "vip2clip"
    assert sidecar["profile"] == "vip2clip-official"
    assert sidecar["detector_config"] == {
        "context_tokens": 7, "class_slots": 3, "fgp_heads": 8, "top_k": 50, "smoothing_sigma": 8.0,
        "global_embedding": "no_ln_post", "prompt_rows": "stored", "full_stop": False, "smoothing_border": "symmetric",
    }
    assert sidecar["layers"] == list(LAYERS) and sidecar["image_size"] == IMAGE_SIZE
    source = sidecar["source"]
    assert source["format"] == "vip2clip-official" and source["file"] == str(official_file)
    assert source["normal_prompt_state_word"] == "damaged" and source["abnormal_prompt_state_word"] == "damaged"
    assert source["token_rows_match_backbone"] is True
    assert source["unused"]["prompt_temp_l1"] == pytest.approx(0.07)
    from model.checkpoint import file_digest

    assert source["sha256"] == file_digest(official_file)


def test_own_vip2clip_keeps_its_clean_profile(tiny_backbone: ClipBackbone) -> None:
    scorer = VIP2CLIP(tiny_backbone, LAYERS, 64)
    assert scorer.profile == "vip2clip" and scorer.checkpoint_metadata()["profile"] == "vip2clip"
    assert scorer.prompt_learner.templates[0].endswith("good X X X.")
    assert not any(name.startswith("prompt_learner.token_") for name in scorer.prompt_state_dict())
    assert VIP2CLIPConfig(global_embedding="no_ln_post").profile == "custom"


# ---------------------------------------------------------------------- malformed files


def _save(tmp_path: Path, data: object, name: str = "bad.pth") -> Path:
    path = tmp_path / name
    torch.save(data, path)
    return path


def _copy(state: dict) -> dict:
    return {entry: dict(tensors) for entry, tensors in state.items()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["prompt_learner"].pop("ctx_pos"), r"prompt_learner: missing keys \['ctx_pos'\]"),
        (lambda s: s.pop("Zero_try"), r"missing entries \['Zero_try'\]"),
        (lambda s: s["Zero_try"].__setitem__("extra.weight", torch.zeros(1)), r"Zero_try: unexpected keys \['extra.weight'\]"),
        (lambda s: s["Zero_try"].__setitem__("q_proj_pre.weight", torch.zeros(64, 65, 1)),
         r"Zero_try.q_proj_pre.weight has shape \(64, 65, 1\), expected \(64, 64, 1\)"),
        (lambda s: s["prompt_learner"].__setitem__("cls_ctx", torch.zeros(3, 768)),
         r"prompt_learner.cls_ctx has shape \(3, 768\), expected \(3, 128\)"),
        (lambda s: s["prompt_learner"].__setitem__("tokenized_prompts_pos", s["prompt_learner"]["tokenized_prompts_pos"].long()),
         r"tokenized_prompts_pos has dtype torch.int64, expected torch.int32"),
        (lambda s: s["prompt_learner"].__setitem__("ctx_neg", s["prompt_learner"]["ctx_neg"].half()),
         r"ctx_neg has dtype torch.float16, expected torch.float32"),
        (lambda s: s["prompt_learner"]["ctx_neg"].__setitem__((0, 0), float("nan")), r"ctx_neg holds NaN or Inf"),
        (lambda s: s["prompt_learner"].__setitem__("tokenized_prompts_neg", torch.roll(s["prompt_learner"]["tokenized_prompts_neg"], 1, 1)),
         r"tokenized_prompts_neg: end-of-text at 13, expected 12"),
    ],
)
def test_malformed_files_are_refused_naming_the_problem(edit, message, state, tiny_backbone, tmp_path) -> None:
    broken = _copy(state)
    broken["prompt_learner"]["ctx_neg"] = broken["prompt_learner"]["ctx_neg"].clone()
    edit(broken)
    path = _save(tmp_path, broken)
    with pytest.raises(CheckpointError, match=message):
        import_official_checkpoint(path, tiny_backbone, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_every_problem_is_named_at_once(state, tiny_backbone) -> None:
    broken = _copy(state)
    broken["prompt_learner"].pop("cls_ctx")
    broken["Zero_try"]["proj_post_t.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as error:
        validate_official_checkpoint(broken, OfficialLayout.from_backbone(tiny_backbone))
    assert "cls_ctx" in str(error.value) and "proj_post_t.bias has shape (5,)" in str(error.value)


class _RunsCode:
    """A pickle that would create a file when unpickled (what a malicious checkpoint does)."""

    marker = ""

    def __reduce__(self):  # noqa: D105
        return (os.mkdir, (self.marker,))


def test_a_pickle_with_code_is_refused_and_never_run(state, tiny_backbone, tmp_path) -> None:
    marker = tmp_path / "pwned"
    _RunsCode.marker = str(marker)
    hostile = _copy(state)
    hostile["prompt_learner"]["ctx_pos"] = _RunsCode()
    path = _save(tmp_path, hostile)
    with pytest.raises(CheckpointError, match="may contain code and was not loaded"):
        import_official_checkpoint(path, tiny_backbone, tmp_path / "out.safetensors")
    assert not marker.exists()  # the payload did not run
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"prompt_learner": _RunsCode()}))  # a bare pickle, not a torch zip
    with pytest.raises(CheckpointError):
        import_official_checkpoint(plain, tiny_backbone, tmp_path / "out.safetensors")
    assert not marker.exists()


def test_not_a_checkpoint_at_all(tiny_backbone, tmp_path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        import_official_checkpoint(garbage, tiny_backbone, tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match="holds a list"):
        import_official_checkpoint(_save(tmp_path, [torch.zeros(1)]), tiny_backbone, tmp_path / "out.safetensors")


# ---------------------------------------------------------------------- real ViT-L-14-336 shapes


def test_real_vit_l_14_336_layout_is_the_reference_table() -> None:
    """The shapes the import expects on ViT-L-14-336 are exactly the reference's table."""
    layout = OfficialLayout.from_model_config("ViT-L-14-336")
    expected = {f"{entry}.{key}": shape for (entry, key), (shape, _) in layout.expected().items()}
    assert expected["prompt_learner.ctx_pos"] == (7, 768) and expected["prompt_learner.cls_ctx"] == (3, 768)
    assert expected["prompt_learner.cls_prompter.bias"] == (1, 768)
    assert expected["prompt_learner.cls_prompter.fc.2.0.weight"] == (384, 768)
    assert expected["prompt_learner.cls_prompter.fc.0.2.weight"] == (768, 384)
    assert expected["prompt_learner.token_suffix_neg"] == (1, 65, 768)
    assert expected["prompt_learner.tokenized_prompts_pos"] == (1, 77)
    assert expected["Zero_try.k_proj_pre_1.weight"] == (768, 768, 1) and expected["Zero_try.prompt_temp_l1"] == ()
    assert len(expected) == 4 + 3 * 4 + 2 * 4 + 4 * 2 + 1
    # A file at those shapes (random values, the real template ids) validates; a tiny one does not.
    from open_clip import get_tokenizer

    ids = get_tokenizer("ViT-L-14-336")([ABNORMAL_TEMPLATE]).to(torch.int32)
    real = {"prompt_learner": {}, "Zero_try": {}}
    for (entry, key), (shape, dtype) in layout.expected().items():
        real[entry][key] = ids.clone() if dtype == torch.int32 else torch.randn(shape)
    validate_official_checkpoint(real, layout)
    with pytest.raises(CheckpointError, match=r"ctx_pos has shape \(7, 768\), expected \(7, 128\)"):
        validate_official_checkpoint(real, OfficialLayout(128, 64, 77))


@pytest.mark.slow
def test_real_vit_l_14_336_file_imports_and_runs(tmp_path: Path) -> None:
    """The whole import on a random-weight ViT-L-14-336 (1 thread): keys, shapes, a forward pass."""
    from model.backbone import load_backbone

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backbone = load_backbone(BackboneSpec("ViT-L-14-336", "random"))
        state = official_state_at(backbone)
        path = _save(tmp_path, state, "mvtec_train_epoch_10.pth")
        result = import_official_checkpoint(path, backbone, tmp_path / "vip_l.safetensors")
        assert result.metadata["layers"] == [6, 12, 18, 24] and result.metadata["image_size"] == 518
        assert result.token_rows_match_backbone
        from model.factory import load_trained_scorer

        scorer, _ = load_trained_scorer("vip2clip", result.checkpoint, backbone, 224)
        with torch.no_grad():
            out = scorer.score_pixels(torch.randn(1, 3, 224, 224), [None])
        assert out.maps.shape == (1, 224, 224) and 0.0 <= float(out.scores[0]) <= 1.0
    finally:
        torch.set_num_threads(previous)


def official_state_at(backbone: ClipBackbone) -> dict[str, dict[str, torch.Tensor]]:
    """Random values at the backbone's widths, real template ids and rows (any backbone)."""
    layout = OfficialLayout.from_backbone(backbone)
    ids = backbone.tokenize([ABNORMAL_TEMPLATE]).to(torch.int32)
    rows = backbone.embed_tokens(ids.long()).detach().float()
    state: dict[str, dict[str, torch.Tensor]] = {"prompt_learner": {}, "Zero_try": {}}
    for (entry, key), (shape, dtype) in layout.expected().items():
        state[entry][key] = ids.clone() if dtype == torch.int32 else torch.randn(shape) * 0.02
    for suffix in ("pos", "neg"):
        state["prompt_learner"][f"token_prefix_{suffix}"] = rows[:, :1].clone()
        state["prompt_learner"][f"token_middle_{suffix}"] = rows[:, 8:9].clone()
        state["prompt_learner"][f"token_suffix_{suffix}"] = rows[:, 12:].clone()
    return state


# ---------------------------------------------------------------------- CLI, predict, service


def test_cli_import_then_predict(official_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights"
    args = ["import-checkpoint", "--format", "vip2clip-official", str(official_file), "--name", "vip_visa",
            "--weights-dir", str(weights), "--image-size", str(IMAGE_SIZE), *TINY_FLAGS]
    assert main(args) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["profile"] == "vip2clip-official" and Path(summary["checkpoint"]) == weights / "vip_visa.safetensors"
    assert "GENCLIP_VIP2CLIP_CHECKPOINT" in out.err
    assert main(args) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    capsys.readouterr()

    image = tmp_path / "part.png"
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (90, 120, 40)).save(image)
    code = main(["predict", str(image), "--detector", "vip2clip", "--vip2clip-checkpoint",
                 str(weights / "vip_visa.safetensors"), "--out", str(tmp_path / "pred"), *TINY_FLAGS])
    assert code == 0
    record = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert record["detector"]["name"] == "vip2clip" and record["predictions"][0]["class_label"] == "object"


def test_cli_import_refuses_a_malformed_file(state, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = _copy(state)
    broken["Zero_try"].pop("v_proj_pre_1.bias")
    path = _save(tmp_path, broken)
    code = main(["import-checkpoint", "--format", "vip2clip-official", str(path), "--name", "x",
                 "--weights-dir", str(tmp_path / "w"), *TINY_FLAGS])
    assert code == 2
    assert "v_proj_pre_1.bias" in capsys.readouterr().err
    assert not (tmp_path / "w" / "x.safetensors").exists()


async def test_service_serves_the_official_profile_through_the_same_factory(imported: Path, detector) -> None:
    from tests.service.svc_helpers import app_client, image_bytes, settings_for

    settings = settings_for(backbone="tiny-clip-random", backbone_weights="random", device="cpu", vip2clip_checkpoint=imported)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    direct = detector.inspect([image])[0]
    async with app_client(settings) as (_, client):
        response = await client.post("/inspect", files={"image": ("part.png", image_bytes(image), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["detector"] == "vip2clip" and body["class_label"] == "object"
    assert body["score"] == pytest.approx(direct.score, abs=1e-5)
    assert body["checkpoint"] == detector.identity.checkpoint
