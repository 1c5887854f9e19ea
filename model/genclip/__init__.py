"""GenCLIP: general query prompts, multi-layer vision prompts, class-name filtering."""

from model.genclip.class_name_filter import ClassNameFilter
from model.genclip.torch_model import GenCLIP, GenCLIPConfig

__all__ = ["ClassNameFilter", "GenCLIP", "GenCLIPConfig"]
