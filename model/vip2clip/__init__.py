"""ViP2-CLIP: image-conditioned prompts (ViP-Prompt) with FGP local refinement."""

from model.vip2clip.fgp import FGP
from model.vip2clip.prompt_learner import ViPPrompt
from model.vip2clip.torch_model import VIP2CLIP, VIP2CLIPConfig, topk_image_logits

__all__ = ["FGP", "VIP2CLIP", "VIP2CLIPConfig", "ViPPrompt", "topk_image_logits"]
