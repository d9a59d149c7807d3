"""Partial images: decode the *predicted clean image* (x0) of a denoising step cheaply.

Raw latents mid-way through denoising look like noise; the x0 the scheduler predicts at that step looks like a
blurry version of the final picture, which is what a partial image should show. Decoders, cheapest first:

- ``linear``: a fixed latent->RGB matrix for known SD latent spaces (SD 1.x/2.x, SDXL); about a millisecond.
- ``taesd``: a tiny autoencoder (AutoencoderTiny) configured by path.
- ``vae``: the pipeline's own VAE on latents average-pooled by ``preview_downscale`` (4x fewer pixels at 2).
"""

from __future__ import annotations

import functools
import io
import logging
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("imagegate.worker")

# Latent -> RGB (approximately in [-1, 1]) per latent space, as ComfyUI's previews use them: factors (one row per
# latent channel) and bias, applied to the latents the model denoises (already scaled or normalised by the pipeline).
_LINEAR: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd": (  # SD 1.x / 2.x
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (  # SDXL, and the models on its VAE (PixArt, HunyuanDiT)
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
    "sd3": (
        [
            [-0.0922, -0.0175, 0.0749],
            [0.0311, 0.0633, 0.0954],
            [0.1994, 0.0927, 0.0458],
            [0.0856, 0.0339, 0.0902],
            [0.0587, 0.0272, -0.0496],
            [-0.0006, 0.1104, 0.0309],
            [0.0978, 0.0306, 0.0427],
            [-0.0042, 0.1038, 0.1358],
            [-0.0194, 0.0020, 0.0669],
            [-0.0488, 0.0130, -0.0268],
            [0.0922, 0.0988, 0.0951],
            [-0.0278, 0.0524, -0.0542],
            [0.0332, 0.0456, 0.0895],
            [-0.0069, -0.0030, -0.0810],
            [-0.0596, -0.0465, -0.0293],
            [-0.1448, -0.1463, -0.1189],
        ],
        [0.2394, 0.2135, 0.1925],
    ),
    "flux": (  # FLUX.1, and the models on its VAE (Chroma, Lumina 2, Z-Image)
        [
            [-0.0346, 0.0244, 0.0681],
            [0.0034, 0.0210, 0.0687],
            [0.0275, -0.0668, -0.0433],
            [-0.0174, 0.0160, 0.0617],
            [0.0859, 0.0721, 0.0329],
            [0.0004, 0.0383, 0.0115],
            [0.0405, 0.0861, 0.0915],
            [-0.0236, -0.0185, -0.0259],
            [-0.0245, 0.0250, 0.1180],
            [0.1008, 0.0755, -0.0421],
            [-0.0515, 0.0201, 0.0011],
            [0.0428, -0.0012, -0.0036],
            [0.0817, 0.0765, 0.0749],
            [-0.1264, -0.0522, -0.1103],
            [-0.0280, -0.0881, -0.0499],
            [-0.1262, -0.0982, -0.0778],
        ],
        [-0.0329, -0.0718, -0.0851],
    ),
    "wan": (  # the Wan 2.1 video VAE of Qwen-Image
        [
            [-0.1299, -0.1692, 0.2932],
            [0.0671, 0.0406, 0.0442],
            [0.3568, 0.2548, 0.1747],
            [0.0372, 0.2344, 0.1420],
            [0.0313, 0.0189, -0.0328],
            [0.0296, -0.0956, -0.0665],
            [-0.3477, -0.4059, -0.2925],
            [0.0166, 0.1902, 0.1975],
            [-0.0412, 0.0267, -0.1364],
            [-0.1293, 0.0740, 0.1636],
            [0.0680, 0.3019, 0.1128],
            [0.0032, 0.0581, 0.0639],
            [-0.1251, 0.0927, 0.1699],
            [0.0060, -0.0633, 0.0005],
            [0.3477, 0.2275, 0.2950],
            [0.1984, 0.0913, 0.1861],
        ],
        [-0.1835, -0.0868, -0.3360],
    ),
}
# How each latent space shows in a VAE's config: (latent channels, scaling factor), or the first latents_mean.
_SPACES = {(4, 0.18215): "sd", (4, 0.13025): "sdxl", (16, 1.5305): "sd3", (16, 0.3611): "flux"}
_WAN_MEAN = -0.7571


def encode_image(image: Image.Image, output_format: str, compression: int | None, *, fast: bool = False) -> bytes:
    """Encode ``image`` as png, jpeg or webp; ``compression`` is OpenAI's output_compression (0-100)."""
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=1 if fast else 6)
    else:
        quality = 100 if compression is None else compression
        if fast:
            quality = min(quality, 85)
        image.save(buf, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return buf.getvalue()


def predicted_x0(scheduler: Any, step_output: Any, model_output: Any, timestep: Any, sample: Any) -> Any:
    """The scheduler's estimate of the clean latents at this step, or None when it cannot be known."""
    if isinstance(step_output, tuple):
        if len(step_output) > 1 and isinstance(step_output[1], torch.Tensor) and step_output[1].shape == sample.shape:
            return step_output[1]
    else:
        pred = getattr(step_output, "pred_original_sample", None)
        if pred is not None:
            return pred
    config = scheduler.config
    flow = "FlowMatch" in type(scheduler).__name__ or config.get("prediction_type") == "flow_prediction"
    if flow and getattr(scheduler, "sigmas", None) is not None:  # velocity: x0 = x_t - sigma_t * v
        index = scheduler.step_index - 1 if scheduler.step_index is not None else 0  # step() already advanced it
        return sample - scheduler.sigmas[index].to(sample) * model_output
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        return None
    a = alphas[int(timestep)].to(device=sample.device, dtype=sample.dtype)
    prediction = config.get("prediction_type", "epsilon")
    if prediction == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if prediction == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if prediction == "sample":
        return model_output
    return None


class X0Tracker:
    """Wraps a job's scheduler so the predicted x0 of the latest step is at hand when a preview is due."""

    def __init__(self, scheduler: Any) -> None:
        self.latest: Any = None
        self.wanted = False
        original = scheduler.step

        # ``wraps`` keeps ``step``'s signature visible: pipelines inspect it to decide whether to pass ``generator``
        # and ``eta``, and without them an ancestral scheduler draws its noise from torch's global RNG.
        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, **kwargs):
            out = original(model_output, timestep, sample, *args, **kwargs)
            if self.wanted:
                self.latest = predicted_x0(scheduler, out, model_output, timestep, sample)
            return out

        scheduler.step = step


class Previewer:
    """Turns a batch of x0 latents into encoded partial images."""

    def __init__(self, pipe: Any, mode: str, downscale: int = 2, taesd: Any = None) -> None:
        self.pipe = pipe
        self.mode = mode
        self.downscale = downscale
        self.taesd = taesd
        if mode == "linear":
            factors, bias = _LINEAR[_latent_space(pipe)]  # type: ignore[index]
            self._matrix = torch.tensor(factors)
            self._bias = torch.tensor(bias)

    @classmethod
    def for_pipeline(cls, pipe: Any, mode: str, downscale: int, taesd_path: str) -> Previewer:
        if mode == "auto":
            mode = "linear" if _latent_space(pipe) is not None else "vae"
        taesd = None
        if mode == "taesd":
            from diffusers import AutoencoderTiny

            taesd = AutoencoderTiny.from_pretrained(taesd_path, dtype=pipe.vae.dtype).to(pipe.vae.device)
        if mode == "linear" and _latent_space(pipe) is None:
            raise ValueError("preview = linear needs a known latent space (SD, SDXL, SD3, FLUX, Wan); use vae or taesd")
        return cls(pipe, mode, downscale, taesd)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Decode x0 ``latents`` into one picture per image, at the requested size.

        Encoding is left to the caller, so it can happen off the denoising thread.
        """
        if latents.ndim == 3 and hasattr(self.pipe, "_unpack_latents"):  # packed (Flux-style) latents
            latents = self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        if self.mode == "linear":
            latents = latents[:, :, 0] if latents.ndim == 5 else latents  # one frame of a video VAE's latents
            rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), self._matrix) + self._bias
            arrays = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().numpy()
            images = [Image.fromarray(a) for a in arrays]
        else:
            if self.mode == "taesd":
                decoded = self.taesd.decode(latents.to(self.taesd.dtype), return_dict=False)[0]
            else:
                decoded = self._vae_decode(latents)
            images = self.pipe.image_processor.postprocess(decoded, output_type="pil")
        return [
            im if im.size == (width, height) else im.resize((width, height), Image.Resampling.BILINEAR) for im in images
        ]

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode with the pipeline's VAE, undoing its latent normalisation; video VAEs (Qwen-Image) take 5-D."""
        vae = self.pipe.vae
        config = vae.config
        frames = latents.ndim == 5  # (batch, channels, frames, height, width): one frame
        lat = latents[:, :, 0] if frames else latents
        if self.downscale > 1 and min(lat.shape[-2:]) >= 2 * self.downscale:
            lat = F.avg_pool2d(lat, self.downscale)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:  # normalised per channel (Wan / Qwen-Image VAEs)
            shape = (1, -1, 1, 1)
            lat = lat * torch.tensor(std).view(shape).to(lat) + torch.tensor(mean).view(shape).to(lat)
        else:
            lat = lat / config.get("scaling_factor", 1.0) + (config.get("shift_factor") or 0.0)
        decoded = vae.decode((lat.unsqueeze(2) if frames else lat).to(vae.dtype), return_dict=False)[0]
        return decoded[:, :, 0] if frames else decoded


def _latent_space(pipe: Any) -> str | None:
    """The known latent space of the pipeline's VAE (a key of ``_LINEAR``), or None."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    config = vae.config
    mean = config.get("latents_mean")
    if config.get("z_dim") == 16 and mean and round(float(mean[0]), 4) == _WAN_MEAN:
        return "wan"
    scaling = config.get("scaling_factor")
    if scaling is None:
        return None
    return _SPACES.get((config.get("latent_channels"), round(float(scaling), 5)))
