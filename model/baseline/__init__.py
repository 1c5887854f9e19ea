"""Training-free baseline: hand-written prompt ensembles on the frozen CLIP."""

from model.baseline.prompt_ensemble import PromptEnsembleScorer

__all__ = ["PromptEnsembleScorer"]
