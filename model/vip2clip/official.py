"""The published ViP2-CLIP prompt checkpoints (``mvtec_train_epoch_10.pth``, ``visa_train_epoch_10.pth``).

Format (``../shared/reference/vip2clip-official-checkpoint.md``): ``torch.save`` of a dict with
two entries, each a plain-tensor ``state_dict``: ``prompt_learner`` (ViP-Prompt) and
``Zero_try`` (FGP). This module knows that format and nothing else: the expected key, shape
and dtype of every tensor for a backbone (:class:`OfficialLayout`), a safe reader
(:func:`read_official_checkpoint`, ``weights_only=True``), a validator that names every
problem at once (:func:`validate_official_checkpoint`) and the key map onto this project's
ViP2-CLIP (:func:`to_prompt_tensors`). ``model.checkpoint_import`` puts them together.

Widths: the published files were trained on ViT-L-14-336 (text width 768, embed dim 768,
context 77), with 7 context tokens and 3 class slots. The layout derives every shape from the
running backbone (text width W, embed dim D, context length C), so the same code validates the
real files on ViT-L-14-336 and test files on the tiny test backbone:

=============================================  ================  =========
key                                            shape             dtype
=============================================  ================  =========
``ctx_pos``, ``ctx_neg``                       (7, W)            float32
``cls_ctx``                                    (3, W)            float32
``cls_prompter.bias``                          (1, W)            float32
``cls_prompter.fc.{j}.0.weight`` / ``.bias``   (D/2, D) / (D/2,) float32
``cls_prompter.fc.{j}.2.weight`` / ``.bias``   (W, D/2) / (W,)   float32
``token_prefix_*``, ``token_middle_*``         (1, 1, W)         float32
``token_suffix_*``                             (1, C-12, W)      float32
``tokenized_prompts_*``                        (1, C)            int32
``q_proj_pre``, ``k_proj_pre_1``,              (D, D, 1) / (D,)  float32
``v_proj_pre_1``, ``proj_post_t`` weight/bias
``prompt_temp_l1``                             ()                float32
=============================================  ================  =========
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.backbone import ClipBackbone
from model.errors import CheckpointError

OFFICIAL_FORMAT = "vip2clip-official"
PROMPT_ENTRY = "prompt_learner"
FGP_ENTRY = "Zero_try"
CONTEXT_TOKENS = 7
CLASS_SLOTS = 3
UNUSED_KEYS = frozenset({(FGP_ENTRY, "prompt_temp_l1")})  # stored but unused at inference

# Published FGP names -> this project's FGP module.
_FGP_NAMES = {"q_proj_pre": "q_proj", "k_proj_pre_1": "k_proj", "v_proj_pre_1": "v_proj", "proj_post_t": "out_proj"}


@dataclass(frozen=True)
class OfficialLayout:
    """Expected tensors of a published checkpoint for one backbone.

    Attributes:
        text_width: W, the text tower's width (768 for ViT-L-14-336).
        embed_dim: D, the joint embedding width (768 for ViT-L-14-336).
        context_length: C, the text context (77).
        context_tokens: n_ctx (7 in the published files).
        class_slots: m (3 in the published files).
    """

    text_width: int
    embed_dim: int
    context_length: int
    context_tokens: int = CONTEXT_TOKENS
    class_slots: int = CLASS_SLOTS

    @classmethod
    def from_backbone(cls, backbone: ClipBackbone) -> OfficialLayout:
        return cls(backbone.text_width, backbone.embed_dim, int(backbone.clip.context_length))

    @classmethod
    def from_model_config(cls, model_name: str) -> OfficialLayout:
        """From an open_clip model config alone (no weights built), e.g. ``ViT-L-14-336``."""
        import open_clip

        config = open_clip.get_model_config(model_name)
        if config is None:
            raise CheckpointError(f"Unknown open_clip model {model_name!r}")
        text = config["text_cfg"]
        return cls(int(text["width"]), int(config["embed_dim"]), int(text.get("context_length", 77)))

    @property
    def end_of_text(self) -> int:
        """Index of the end-of-text token: ``[SOT] [ctx x n] [state] [slots x m] [EOT]``, no full stop."""
        return 1 + self.context_tokens + 1 + self.class_slots

    def expected(self) -> dict[tuple[str, str], tuple[tuple[int, ...], torch.dtype]]:
        """``{(entry, key): (shape, dtype)}`` of every tensor the file must hold."""
        width, dim, hidden = self.text_width, self.embed_dim, self.embed_dim // 2
        f32 = torch.float32
        prompt: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "ctx_pos": ((self.context_tokens, width), f32),
            "ctx_neg": ((self.context_tokens, width), f32),
            "cls_ctx": ((self.class_slots, width), f32),
            "cls_prompter.bias": ((1, width), f32),
        }
        for j in range(self.class_slots):
            prompt[f"cls_prompter.fc.{j}.0.weight"] = ((hidden, dim), f32)
            prompt[f"cls_prompter.fc.{j}.0.bias"] = ((hidden,), f32)
            prompt[f"cls_prompter.fc.{j}.2.weight"] = ((width, hidden), f32)
            prompt[f"cls_prompter.fc.{j}.2.bias"] = ((width,), f32)
        for suffix in ("pos", "neg"):
            prompt[f"token_prefix_{suffix}"] = ((1, 1, width), f32)
            prompt[f"token_middle_{suffix}"] = ((1, 1, width), f32)
            prompt[f"token_suffix_{suffix}"] = ((1, self.context_length - 2 - self.context_tokens - self.class_slots, width), f32)
            prompt[f"tokenized_prompts_{suffix}"] = ((1, self.context_length), torch.int32)
        fgp: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"prompt_temp_l1": ((), f32)}
        for name in _FGP_NAMES:
            fgp[f"{name}.weight"] = ((dim, dim, 1), f32)
            fgp[f"{name}.bias"] = ((dim,), f32)
        return {
            **{(PROMPT_ENTRY, key): value for key, value in prompt.items()},
            **{(FGP_ENTRY, key): value for key, value in fgp.items()},
        }


def read_official_checkpoint(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Load a published checkpoint with ``torch.load(weights_only=True)``: plain tensors only.

    Raises:
        CheckpointError: the file is missing, not a torch file, or holds anything but plain
            containers and tensors (a pickle with code in it is refused unread, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(str(error))
        if "GLOBAL" in reason:
            raise CheckpointError(
                f"{path} holds more than plain tensors, so torch refused to unpickle it safely "
                f"(weights_only=True: {reason}). The published ViP2-CLIP checkpoints are plain state dicts; "
                "this file may contain code and was not loaded."
            ) from error
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint of plain tensors (weights_only=True: {reason}); "
            "it was not loaded."
        ) from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {error}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not the dict of {PROMPT_ENTRY!r} and {FGP_ENTRY!r}")
    return data


def _unpickling_reason(message: str) -> str:
    """The informative line of torch's weights-only refusal (its first lines are boilerplate)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported") or ("error" in line.lower() and "WeightsUnpickler" not in line):
            return line
    return lines[-1] if lines else "unknown reason"


def validate_official_checkpoint(data: dict[str, Any], layout: OfficialLayout, source: str = "the file") -> None:
    """Check every entry, key, shape, dtype and value against ``layout``.

    Raises:
        CheckpointError: listing every missing, unexpected, wrongly shaped, wrongly typed or
            non-finite tensor, and a template whose end-of-text is not where the layout puts it.
    """
    problems: list[str] = []
    entries = {PROMPT_ENTRY, FGP_ENTRY}
    missing_entries = sorted(entries - set(data))
    unexpected_entries = sorted(map(str, set(data) - entries))
    if missing_entries:
        problems.append(f"missing entries {missing_entries}")
    if unexpected_entries:
        problems.append(f"unexpected entries {unexpected_entries}")
    expected = layout.expected()
    found: dict[tuple[str, str], Any] = {}
    for entry in sorted(entries & set(data)):
        if not isinstance(data[entry], dict):
            problems.append(f"{entry} is a {type(data[entry]).__name__}, not a state dict")
            continue
        found.update({(entry, str(key)): value for key, value in data[entry].items()})
    for entry in sorted(entries & set(data)):
        if isinstance(data[entry], dict):
            missing = sorted(key for (where, key) in expected if where == entry and (where, key) not in found)
            unexpected = sorted(key for (where, key) in found if where == entry and (where, key) not in expected)
            if missing:
                problems.append(f"{entry}: missing keys {missing}")
            if unexpected:
                problems.append(f"{entry}: unexpected keys {unexpected}")
    for (entry, key), value in sorted(found.items()):
        if (entry, key) not in expected:
            continue
        shape, dtype = expected[(entry, key)]
        name = f"{entry}.{key}"
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != shape:
            problems.append(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        if value.dtype != dtype:
            problems.append(f"{name} has dtype {value.dtype}, expected {dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{name} holds NaN or Inf")
    for suffix in ("pos", "neg"):
        ids = found.get((PROMPT_ENTRY, f"tokenized_prompts_{suffix}"))
        if isinstance(ids, torch.Tensor) and tuple(ids.shape) == (1, layout.context_length):
            position = int(ids.argmax(dim=-1))
            if position != layout.end_of_text:
                problems.append(
                    f"{PROMPT_ENTRY}.tokenized_prompts_{suffix}: end-of-text at {position}, expected "
                    f"{layout.end_of_text} ({layout.context_tokens} context tokens, a state word, "
                    f"{layout.class_slots} class slots, no full stop)"
                )
    if problems:
        raise CheckpointError(
            f"{source} is not a ViP2-CLIP checkpoint in the published format for this backbone "
            f"(text width {layout.text_width}, embed dim {layout.embed_dim}, context {layout.context_length}): "
            + "; ".join(problems)
        )


def to_prompt_tensors(data: dict[str, dict[str, torch.Tensor]], layout: OfficialLayout) -> dict[str, torch.Tensor]:
    """Map a validated published checkpoint onto this project's ViP2-CLIP state dict keys.

    Returns:
        ``{name: tensor}`` for :meth:`model.vip2clip.VIP2CLIP.prompt_state_dict` of a scorer in
        profile ``vip2clip-official`` (token ids as int64, the bias as (W,)); ``prompt_temp_l1``
        is left out (unused at inference).
    """
    prompt, fgp = data[PROMPT_ENTRY], data[FGP_ENTRY]
    tensors = {
        "prompt_learner.normal_context": prompt["ctx_pos"],
        "prompt_learner.abnormal_context": prompt["ctx_neg"],
        "prompt_learner.class_slots": prompt["cls_ctx"],
        "prompt_learner.slot_bias": prompt["cls_prompter.bias"].reshape(-1),
    }
    for j in range(layout.class_slots):
        for layer in ("0", "2"):
            for kind in ("weight", "bias"):
                tensors[f"prompt_learner.slot_mlps.{j}.{layer}.{kind}"] = prompt[f"cls_prompter.fc.{j}.{layer}.{kind}"]
    for suffix in ("pos", "neg"):
        for row in ("token_prefix", "token_middle", "token_suffix"):
            tensors[f"prompt_learner.{row}_{suffix}"] = prompt[f"{row}_{suffix}"]
        tensors[f"prompt_learner.tokenized_prompts_{suffix}"] = prompt[f"tokenized_prompts_{suffix}"].long()
    for published, ours in _FGP_NAMES.items():
        tensors[f"fgp.{ours}.weight"] = fgp[f"{published}.weight"]
        tensors[f"fgp.{ours}.bias"] = fgp[f"{published}.bias"]
    return {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
