"""imagegate: an OpenAI-compatible image generation gateway for self-hosted diffusion models."""

__version__ = "0.1.0"
