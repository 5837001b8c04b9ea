"""drm-ray: Diffusion-based Reward Model (DRM), Step-GRPO and Step-wise Sampling for SD3-family models, on Ray."""

__version__ = "0.1.0"
