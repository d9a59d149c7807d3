"""Model families: what differs between the diffusers pipelines people serve, declared once per family.

A family is found from the loaded text-to-image pipeline's class (:func:`family_of`). It says which sampler names
apply (ε/v-prediction samplers for Stable-Diffusion-like models, flow-matching samplers for velocity models; each is
built from the model's own scheduler config, so shift and dynamic-shifting settings survive), the steps and guidance
a request gets when it names none, and how guidance reaches the pipeline. Which of the family's samplers a given
checkpoint can really run is then settled by running them once at start-up (``pipelines.load_model``).

A pipeline of no known family gets a generic family, which claims only what the pipeline shows: flow matching when
its scheduler is a flow-matching one, and no defaults of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.worker.protocol import DIFFUSION_SCHEDULERS, FLOW_SCHEDULERS


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...] = ()
    """Class names of the family's text-to-image pipelines."""
    flow: bool = False
    """A flow-matching (velocity) model: only flow samplers apply."""
    steps: int | None = None
    """Steps when a request names none (a model's ``default_steps`` setting overrides it)."""
    guidance: float | None = None
    """Guidance when a request names none (a model's ``default_guidance`` setting overrides it)."""
    empty_negative_prompt: bool = False
    """The pipeline encodes a missing negative prompt as an empty one, so jobs with and without one can share a call
    (SDXL zeroes a missing one's embedding instead; Flux runs true CFG only when one is given)."""
    negative_cfg: float | None = None
    """For pipelines whose ``guidance_scale`` is distilled guidance (FLUX.1-dev): the ``true_cfg_scale`` that makes a
    request's negative prompt count (the pipeline ignores it otherwise)."""
    true_cfg: bool = False
    """Guidance is the pipeline's ``true_cfg_scale``, which it applies only with a negative prompt: an empty one is
    sent when the request has none, so that guidance always applies."""

    @property
    def schedulers(self) -> tuple[str, ...]:
        return FLOW_SCHEDULERS if self.flow else DIFFUSION_SCHEDULERS


FAMILIES = (
    Family("sd", ("StableDiffusionPipeline",), steps=30, guidance=7.5, empty_negative_prompt=True),
    Family("sdxl", ("StableDiffusionXLPipeline",), steps=30, guidance=5.0),
    Family("sd3", ("StableDiffusion3Pipeline",), flow=True, steps=28, guidance=7.0, empty_negative_prompt=True),
    Family("flux", ("FluxPipeline",), flow=True, steps=28, guidance=3.5, negative_cfg=4.0),
    Family("flux2", ("Flux2Pipeline", "Flux2KleinPipeline"), flow=True, steps=28, guidance=4.0),
    Family("chroma", ("ChromaPipeline",), flow=True, steps=40, guidance=3.0),
    Family("qwen_image", ("QwenImagePipeline",), flow=True, steps=50, guidance=4.0, true_cfg=True),
    Family("sana", ("SanaPipeline",), flow=True, steps=20, guidance=4.5),
    Family("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), steps=20, guidance=4.5),
    Family("lumina2", ("Lumina2Pipeline",), flow=True, steps=50, guidance=4.0),
    Family("z_image", ("ZImagePipeline",), flow=True, steps=9, guidance=0.0),
    Family("hunyuandit", ("HunyuanDiTPipeline",), steps=50, guidance=5.0),
)
_BY_PIPELINE = {name: family for family in FAMILIES for name in family.pipelines}


def family_of(pipe: Any) -> Family:
    """The family of a loaded text-to-image pipeline."""
    known = _BY_PIPELINE.get(type(pipe).__name__)
    if known is not None:
        return known
    config = pipe.scheduler.config
    flow = "FlowMatch" in type(pipe.scheduler).__name__ or config.get("prediction_type") == "flow_prediction"
    return Family("generic", flow=flow)
