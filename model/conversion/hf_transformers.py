"""A Hugging Face transformers CLIP folder -> open_clip's ``CLIP`` state dict, key by key.

Reads ``config.json`` (``model_type: clip``) and ``model.safetensors`` (preferred) or
``pytorch_model.bin`` (``weights_only=True``). The mapping:

=====================================================  =========================================
transformers (``CLIPModel``)                           open_clip (``CLIP``)
=====================================================  =========================================
``vision_model.embeddings.class_embedding``            ``visual.class_embedding``
``vision_model.embeddings.patch_embedding.weight``     ``visual.conv1.weight``
``vision_model.embeddings.position_embedding.weight``  ``visual.positional_embedding``
``vision_model.pre_layrnorm.*``                        ``visual.ln_pre.*``
``vision_model.post_layernorm.*``                      ``visual.ln_post.*``
``visual_projection.weight`` (D, W)                    ``visual.proj`` (W, D): transposed
``text_model.embeddings.token_embedding.weight``       ``token_embedding.weight``
``text_model.embeddings.position_embedding.weight``    ``positional_embedding``
``text_model.final_layer_norm.*``                      ``ln_final.*``
``text_projection.weight`` (D, W)                      ``text_projection`` (W, D): transposed
``logit_scale``                                        ``logit_scale``
``{tower}.encoder.layers.{i}.self_attn.{q,k,v}_proj``  ``{tower'}.resblocks.{i}.attn.in_proj_*``:
                                                       q, k, v concatenated
``... self_attn.out_proj``                             ``... attn.out_proj``
``... layer_norm1`` / ``layer_norm2``                  ``... ln_1`` / ``ln_2``
``... mlp.fc1`` / ``mlp.fc2``                          ``... mlp.c_fc`` / ``mlp.c_proj``
=====================================================  =========================================

(``{tower'}`` is ``visual.transformer`` or ``transformer``.) ``position_ids`` buffers of older
files are skipped; any other key left over is an error. QuickGELU comes from ``hidden_act``
(``quick_gelu`` for OpenAI's models), the attention heads from ``num_attention_heads``; the
layer-norm epsilon must be open_clip's 1e-5.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from model.conversion import ConvertedWeights
from model.errors import WeightsFormatError

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_TOWERS = {"vision_model": "visual.transformer", "text_model": "transformer"}
_LAYER_PARTS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_DIRECT = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_OPEN_CLIP_LAYER_NORM_EPS = 1e-5


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsFormatError(f"{folder} has no config.json: not a Hugging Face transformers model folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsFormatError(f"{path} is not valid JSON: {error}") from error
    if config.get("model_type") != "clip":
        raise WeightsFormatError(
            f"{path}: model_type {config.get('model_type')!r}; only transformers CLIPModel folders "
            "(model_type 'clip') can be converted"
        )
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
            raise WeightsFormatError(f"{path} cannot be read as plain tensors: {str(error).splitlines()[0]}") from error
        if not isinstance(state, dict):
            raise WeightsFormatError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state
    raise WeightsFormatError(f"{folder} has neither {' nor '.join(_WEIGHT_FILES)} (sharded checkpoints are not supported)")


def _tower_facts(config: dict[str, Any]) -> tuple[bool, dict[str, int]]:
    activations, heads = set(), {}
    for tower, key in (("vision", "vision_config"), ("text", "text_config")):
        sub = config.get(key) or {}
        activations.add(sub.get("hidden_act", "quick_gelu"))
        heads[tower] = int(sub.get("num_attention_heads", 12 if tower == "vision" else 8))
        eps = float(sub.get("layer_norm_eps", _OPEN_CLIP_LAYER_NORM_EPS))
        if abs(eps - _OPEN_CLIP_LAYER_NORM_EPS) > 1e-12:
            raise WeightsFormatError(f"{key}.layer_norm_eps is {eps}; open_clip's CLIP uses {_OPEN_CLIP_LAYER_NORM_EPS}")
    if not activations <= {"quick_gelu", "gelu"} or len(activations) != 1:
        raise WeightsFormatError(
            f"hidden_act {sorted(activations)}: open_clip's CLIP needs one activation for both towers, "
            "quick_gelu or gelu"
        )
    return activations == {"quick_gelu"}, heads


def map_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPModel`` keys -> open_clip ``CLIP`` keys (see the module docstring).

    Raises:
        WeightsFormatError: keys that have no place in open_clip's layout, or a layer whose
            q/k/v projections are incomplete.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    leftover = []
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _LAYER.match(key):
            tower, index, part = match.groups()
            prefix = f"{_TOWERS[tower]}.resblocks.{index}"
            if part in _LAYER_PARTS:
                out[f"{prefix}.{_LAYER_PARTS[part]}"] = value
            elif part.startswith("self_attn.") and part.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, kind = part.split(".")
                qkv.setdefault((prefix, kind), {})[projection] = value
            else:
                leftover.append(key)
        else:
            leftover.append(key)
    for (prefix, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise WeightsFormatError(f"{prefix}: incomplete attention projections {sorted(parts)} ({kind})")
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    if leftover:
        raise WeightsFormatError(f"keys with no place in open_clip's CLIP layout: {sorted(leftover)[:10]}")
    return out


def read_hf_clip_folder(folder: Path) -> ConvertedWeights:
    """Read a transformers CLIP folder into an open_clip-layout state dict.

    Raises:
        WeightsFormatError: not a CLIP folder, unreadable weights, an unsupported activation or
            epsilon, or keys that do not map.
    """
    config = _read_config(folder)
    quick_gelu, heads = _tower_facts(config)
    state = map_hf_state_dict(_read_weights(folder))
    details = {"source_file": folder.name, "hf_name_or_path": str(config.get("_name_or_path", ""))}
    return ConvertedWeights(state, quick_gelu=quick_gelu, source_kind="hf-transformers", heads=heads, details=details)
