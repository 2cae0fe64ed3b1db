"""MoE model architectures: the description, the bundled presets and Hugging Face import."""

from moesim.models.spec import AttentionSpec, ModelSpec, MoESpec

__all__ = ["AttentionSpec", "MoESpec", "ModelSpec"]
