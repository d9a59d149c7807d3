"""Tiny random-weight diffusers pipelines of the model families people serve, for tests.

Each builder returns a pipeline with its family's real structure and tiny widths: the real pipeline, text-encoder,
tokenizer, transformer/UNet and VAE classes, the real latent channels, VAE downsampling, latent packing and VAE
scaling/shift factors (or latents mean/std), and the family's scheduler class and ``scheduler_config.json`` as the
published model ships it. Widths, depths and vocabularies are tiny, so a 64x64 step takes milliseconds on a CPU and a
saved pipeline weighs one to three megabytes. The pictures are noise, not foxes.

Tokenizers are built in memory (no download, no sentencepiece): byte-level BPE for CLIP and Qwen, Unigram for T5,
byte-fallback BPE for Gemma and WordPiece for BERT, each with the real special tokens and a small English vocabulary
that holds every word of the pipelines' prompt templates, so templates cost about as many tokens as with the real
tokenizers (Qwen-Image drops its template's first 34 tokens, which is exact here).

Resolution binning, as the real pipelines do it: with their default ``use_resolution_binning=True``, Sana (its 512px
model here) renders a 64x64 request at 512x512 and PixArt-Sigma (its 256px model) at 256x256, then they resize the
picture to 64x64; HunyuanDiT renders at its nearest standard shape (1024x1024 for a square) and returns that size, so
a 64x64 HunyuanDiT picture needs ``use_resolution_binning=False``.

Typical use::

    path = save_family("flux", tmp_path / "flux")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe(prompt="a fox", height=64, width=64, num_inference_steps=2)

Attributes:
    FAMILIES: Family name -> builder of its pipeline (seeded, so two builds have the same weights).
    SCHEDULER_CONFIGS: Family name -> its published ``scheduler_config.json`` (``published_scheduler`` builds it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import DiffusionPipeline

# Words every tokenizer here knows as whole tokens: the pipelines' prompt templates (Qwen-Image's system prompt,
# Sana's complex human instruction, Lumina 2's system prompt), the chat templates, and common prompt words.
_TEXT = """
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects
and background system user assistant
Given a user prompt, generate an Enhanced prompt that provides detailed visual descriptions suitable for image
generation. Evaluate the level of detail in the user prompt: If the prompt is simple, focus on adding specifics about
colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes. If the prompt is
already detailed, refine and enhance the existing details slightly without overcomplicating. Here are examples of how
to transform or refine prompts: User Prompt: A cat sleeping Enhanced: A small, fluffy white cat curled up in a round
shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers. A busy city street
Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful
clothing, and a double-decker bus passing by towering glass skyscrapers. Please generate only the enhanced description
for the prompt below and avoid including any additional commentary or evaluations
You are an assistant designed to generate superior images with the superior degree of image-text alignment based on
textual prompts or user prompts. Prompt Start
a an the of in on at with and or fox dog cat bird horse photo photograph painting drawing portrait landscape picture
red orange yellow green blue purple black white gray brown pink gold silver sunset sunrise night day sky sea ocean
river lake forest mountain mountains tree trees flower flowers garden house castle city street road beach desert snow
rain fog cloud clouds light dark bright cute beautiful tiny big small large old young man woman girl boy child
astronaut robot riding sitting standing running flying wearing holding cinematic detailed realistic style art digital
oil watercolor anime sketch high quality low blurry ugly best masterpiece 4k 8k hd
"""
_WORDS = tuple(dict.fromkeys(re.findall(r"[A-Za-z0-9]+", _TEXT)))
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + _PUNCTUATION

# A Qwen3-style chat template (Z-Image and FLUX.2 [klein] apply it; ``enable_thinking=False`` adds the empty think
# block as Qwen3's does).
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


# --- tokenizers -------------------------------------------------------------------------------------------------


def _train_bpe(
    pre_tokenizer: Any, normalizer: Any, alphabet: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges that make each of ``_WORDS``, alone or after a space, a single token.

    Trained (deterministically) rather than written by hand, so the merges' ranks are consistent: a hand-made merge
    list lets a merge meant for one word split another.
    """
    import json

    from tokenizers import Tokenizer, models, trainers

    tk = Tokenizer(models.BPE())
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=0, show_progress=False, initial_alphabet=alphabet)
    tk.train_from_iterator([text for w in _WORDS for text in (w, " " + w)], trainer)
    model = json.loads(tk.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def clip_tokenizer() -> Any:
    """CLIP's tokenizer, built in memory (the worker's own, shared with the demo model)."""
    from app.worker.pipelines import clip_tokenizer as worker_clip_tokenizer

    return worker_clip_tokenizer()


def t5_tokenizer() -> Any:
    """A T5 (v1.1 / mT5 kind) Unigram tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, 100 ``<extra_id_*>``."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _WORDS]
    vocab += [(c, -6.0) for c in _ASCII]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)


def qwen_tokenizer(special: tuple[str, ...], eos: str = "<|im_end|>", chat_template: str | None = None) -> Any:
    """A Qwen2 byte-level BPE tokenizer with Qwen's pre-tokenizer, ``<|endoftext|>`` padding and ``special`` tokens."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    backend = Qwen2Tokenizer()._tokenizer  # Qwen's NFC normalizer, split regex and byte-level pre-tokenizer
    vocab, merges = _train_bpe(backend.pre_tokenizer, backend.normalizer, pre_tokenizers.ByteLevel.alphabet())
    for tok in ("<|endoftext|>", *special):
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token=eos,
        pad_token="<|endoftext|>",
        extra_special_tokens=list(special),
        chat_template=chat_template,
        model_max_length=131072,
    )


def gemma_tokenizer() -> Any:
    """A Gemma (2) byte-fallback BPE tokenizer: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 (prepended), ``<unk>`` 3."""
    from tokenizers import pre_tokenizers
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for tok in ("<start_of_turn>", "<end_of_turn>"):
        vocab[tok] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    # Gemma's BPE sees the whole text with spaces made "▁"; train on words split before each "▁" so that no merge
    # spans two words, as in the real merges.
    words, merges = _train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True), None, list("▁" + _ASCII)
    )
    for tok in words:
        vocab.setdefault(tok, len(vocab))
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        add_bos_token=True,
        model_max_length=8192,
    )


def bert_tokenizer() -> Any:
    """A lower-casing BERT WordPiece tokenizer (HunyuanDiT's first tokenizer is Chinese CLIP's BERT one)."""
    from transformers import BertTokenizer

    vocab = {tok: i for i, tok in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))}
    for piece in [*(w.lower() for w in _WORDS), *_ASCII.lower(), *("##" + c for c in _ASCII.lower())]:
        vocab.setdefault(piece, len(vocab))
    return BertTokenizer(vocab=vocab, model_max_length=77)


# --- text encoders ----------------------------------------------------------------------------------------------


def _clip_text(tokenizer: Any, projection: bool, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(tokenizer: Any, d_model: int = 32) -> Any:
    """A T5 v1.1 encoder (gated GELU, untied embeddings), as Flux, SD3, PixArt, Chroma and HunyuanDiT (mT5) use."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _gemma2(tokenizer: Any, hidden: int = 16) -> Any:
    """A Gemma 2 model (Sana and Lumina 2 read its hidden states)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return Gemma2Model(config).eval()


def _qwen3_config(tokenizer: Any, hidden: int, layers: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# --- VAEs -------------------------------------------------------------------------------------------------------


def _kl_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, quant: bool = True) -> Any:
    """The SD-family AutoencoderKL: four blocks, so 8x downsampling as in the real ones, only narrow."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=1024,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        force_upcast=True,
    ).eval()


def _sdxl_vae() -> Any:
    """SDXL's VAE (PixArt-Sigma and HunyuanDiT use it too): 4 channels, scaling 0.13025."""
    return _kl_vae(4, 0.13025)


def _flux_vae() -> Any:
    """FLUX.1's VAE (Chroma, Lumina 2 and Z-Image use it too): 16 channels, scaling 0.3611, shift 0.1159."""
    return _kl_vae(16, 0.3611, 0.1159, quant=False)


# --- schedulers: each published model's scheduler/scheduler_config.json ---------------------------------------------
# Built with ``from_config`` from the file's keys, so keys the class does not take (SDXL's ``skip_prk_steps`` ...) are
# kept in its config and reach another scheduler class made ``from_config``, as they do with the real model.

SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    # stabilityai/stable-diffusion-3-medium-diffusers (3.5 Large/Medium: the same)
    "sd3": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
    },
    # black-forest-labs/FLUX.1-dev
    "flux": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    # Qwen/Qwen-Image
    "qwen_image": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 8192,
        "max_shift": 0.9,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": True,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    },
    # Efficient-Large-Model/Sana_1600M_512px_diffusers (and the 1024px ones; 6.0 for 4K): DPM-Solver++ on flow sigmas.
    "sana": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "flow_shift": 3.0,
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "flow_prediction",
        "sample_max_value": 1.0,
        "solver_order": 2,
        "solver_type": "midpoint",
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "linspace",
        "trained_betas": None,
        "use_flow_sigmas": True,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
    },
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS and -512-MS (the 256x256 transformer is used with these): the defaults.
    "pixart_sigma": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "solver_order": 2,
        "solver_type": "midpoint",
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "linspace",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
    },
    # Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers: v-prediction DDPM.
    "hunyuandit": {
        "_class_name": "DDPMScheduler",
        "beta_end": 0.03,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "sample_max_value": 1.0,
        "steps_offset": 1,
        "thresholding": False,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "variance_type": "fixed_small",
    },
    # Alpha-VLLM/Lumina-Image-2.0
    "lumina2": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 6.0,
        "shift_terminal": None,
        "use_beta_sigmas": False,
        "use_dynamic_shifting": False,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    },
    # lodestones/Chroma1-HD: FLUX.1-schnell's, so no shift at all (the pipeline computes a mu that goes unused).
    "chroma": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
    # Tongyi-MAI/Z-Image-Turbo
    "z_image": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": False,
    },
    # black-forest-labs/FLUX.2-klein-4B (FLUX.2's conversion copies FLUX.1-dev's; the pipeline computes its own mu).
    "flux2_klein": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
}


def published_scheduler(family: str) -> Any:
    """A fresh scheduler of ``family``'s published class and config."""
    import diffusers

    config = SCHEDULER_CONFIGS[family]
    return getattr(diffusers, config["_class_name"]).from_config(config)


# --- families ---------------------------------------------------------------------------------------------------


def build_sdxl() -> DiffusionPipeline:
    """stabilityai/stable-diffusion-xl-base-1.0: UNet with text-time conditioning, two CLIP encoders, Euler."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = _clip_text(tokenizer, projection=False)
    text_encoder_2 = _clip_text(tokenizer_2, projection=True)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(1, 2, 4),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,  # text_encoder's 32 + text_encoder_2's 32 (768 + 1280 real)
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six micro-conditions + text_encoder_2's pooled output
    ).eval()
    vae = _sdxl_vae()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=published_scheduler("sdxl"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_sd3() -> DiffusionPipeline:
    """stabilityai/stable-diffusion-3-medium-diffusers: MMDiT, CLIP-L + CLIP-G + T5, flow matching with shift 3."""
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _clip_text(tokenizer, projection=True)
    text_encoder_2 = _clip_text(tokenizer_2, projection=True)
    text_encoder_3 = _t5(tokenizer_3, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width; the two CLIPs' 32 + 32 are padded to it (4096 real)
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIPs' pooled 32 + 32 (768 + 1280 real)
        pos_embed_max_size=96,
    ).eval()
    vae = _kl_vae(16, 1.5305, 0.0609, quant=False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=published_scheduler("sd3"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    )


def build_flux() -> DiffusionPipeline:
    """black-forest-labs/FLUX.1-dev: 2x2-packed 16-channel latents, CLIP-L + T5, guidance embedding, dynamic shift."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _clip_text(tokenizer, projection=False)
    text_encoder_2 = _t5(tokenizer_2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width (4096 real)
        pooled_projection_dim=32,  # CLIP's pooled width (768 real)
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim, as (16, 56, 56) does to 128
    ).eval()
    return FluxPipeline(
        scheduler=published_scheduler("flux"),
        vae=_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


# Qwen-Image's VAE is Wan 2.1's, with these per-channel latent statistics.
_WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
_WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


def build_qwen_image() -> DiffusionPipeline:
    """Qwen/Qwen-Image: Qwen2.5-VL text encoder, 5-D (video) VAE, 2x2-packed latents, exponential dynamic shift."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    specials = (
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )
    tokenizer = qwen_tokenizer(specials)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},  # head_dim 8: 1 + 1 + 2 = 8 / 2
            "rope_theta": 1000000.0,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 packing
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,  # the text encoder's width (3584 real)
        guidance_embeds=False,
        axes_dims_rope=(4, 4, 8),  # (16, 56, 56) real
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=8,  # 96 real
        z_dim=16,
        dim_mult=[1, 2, 4, 4],  # lists: the class concatenates them
        num_res_blocks=1,  # 2 real
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=_WAN_LATENTS_MEAN,
        latents_std=_WAN_LATENTS_STD,
    ).eval()
    return QwenImagePipeline(
        scheduler=published_scheduler("qwen_image"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def build_sana() -> DiffusionPipeline:
    """Efficient-Large-Model/Sana_1600M_512px_diffusers: Gemma 2, linear-attention DiT, 32x DC-AE, flow DPM-Solver."""
    import torch
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel

    tokenizer = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = _gemma2(tokenizer, hidden=16)
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,  # Gemma's width (2304 real)
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=16,  # the 512px model: 512 / 32; selects the 512px aspect-ratio bins
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        interpolation_scale=None,
    ).eval()
    # dc-ae-f32c32-sana-1.0: six stages (32x), ResBlocks then EfficientViT blocks, 32 latent channels. The last
    # stage is as wide as the latent (1024 real): the encoder's output and decoder's input shortcuts need a multiple.
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=4,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(4, 8, 8, 16, 32, 32),
        decoder_block_out_channels=(4, 8, 8, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
        scaling_factor=0.41407,
    ).eval()
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=published_scheduler("sana"),
    )


def build_pixart_sigma() -> DiffusionPipeline:
    """PixArt-alpha/PixArt-Sigma-XL-2-256x256: T5, adaLN-single DiT with learned sigma, SDXL VAE, DPM-Solver++.

    The 256px model (the smallest aspect-ratio bins, so a binned call stays cheap); the 512px and 1024px ones differ
    only in ``sample_size`` and ``interpolation_scale``.
    """
    import torch
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _t5(tokenizer, d_model=32)
    transformer = PixArtTransformer2DModel(
        sample_size=32,  # 256 / 8: selects the 256px aspect-ratio bins
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,  # learned sigma: twice the latent channels
        patch_size=2,
        attention_bias=True,
        cross_attention_dim=24,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=32,  # T5's width (4096 real)
        interpolation_scale=0.5,  # 256px
        use_additional_conditions=False,  # no micro-conditions in Sigma
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_sdxl_vae(),
        transformer=transformer,
        scheduler=published_scheduler("pixart_sigma"),
    )


def build_hunyuandit() -> DiffusionPipeline:
    """Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers: bilingual CLIP (BERT) + mT5, DiT with learned sigma, v-pred DDPM."""
    import torch
    from diffusers import HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    tokenizer, tokenizer_2 = bert_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    text_encoder_2 = _t5(tokenizer_2, d_model=32)
    transformer = HunyuanDiT2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=3,
        hidden_size=24,
        cross_attention_dim=32,  # BERT's width (1024 real)
        cross_attention_dim_t5=32,  # mT5's width (2048 real)
        pooled_projection_dim=16,
        text_len=77,
        text_len_t5=256,
        activation_fn="gelu-approximate",
        use_style_cond_and_image_meta_size=False,  # v1.2
    ).eval()
    return HunyuanDiTPipeline(
        vae=_sdxl_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=published_scheduler("hunyuandit"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def build_lumina2() -> DiffusionPipeline:
    """Alpha-VLLM/Lumina-Image-2.0: Gemma 2 with a system prompt, unified next-DiT, FLUX.1 VAE, shift 6."""
    import torch
    from diffusers import Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = gemma_tokenizer()
    torch.manual_seed(0)
    text_encoder = _gemma2(tokenizer, hidden=16)
    transformer = Lumina2Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 6, 6),  # sums to the head width 16, as (32, 32, 32) does to 96
        axes_lens=(300, 512, 512),
        cap_feat_dim=16,  # Gemma's width (2304 real)
    ).eval()
    return Lumina2Pipeline(
        transformer=transformer,
        scheduler=published_scheduler("lumina2"),
        vae=_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def build_chroma() -> DiffusionPipeline:
    """lodestones/Chroma1-HD: FLUX.1-schnell-derived, T5 only, distilled modulation, no dynamic shift (shift 1)."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = _t5(tokenizer, d_model=32)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's width (4096 real)
        axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    ).eval()
    return ChromaPipeline(
        scheduler=published_scheduler("chroma"),
        vae=_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def build_z_image() -> DiffusionPipeline:
    """Tongyi-MAI/Z-Image-Turbo: Qwen3 (chat template), single-stream DiT, FLUX.1 VAE, fixed shift 3."""
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen_tokenizer(
        ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), chat_template=_QWEN3_CHAT_TEMPLATE
    )
    torch.manual_seed(0)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, hidden=16, layers=2)).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,  # Qwen3's width (2560 real)
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=(4, 6, 6),  # sums to the head width 16, as (32, 48, 48) does to 128
        axes_lens=(1536, 512, 512),
    )
    # Pad tokens are created with torch.empty; fix them so a build is reproducible and NaN-free.
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return ZImagePipeline(
        scheduler=published_scheduler("z_image"),
        vae=_flux_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )


def build_flux2_klein() -> DiffusionPipeline:
    """black-forest-labs/FLUX.2-klein-4B: Qwen3 (three hidden layers stacked), FLUX.2 VAE (32 ch, 2x2 patchified)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen_tokenizer(
        ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), chat_template=_QWEN3_CHAT_TEMPLATE
    )
    torch.manual_seed(0)
    # The pipeline stacks hidden states 9, 18 and 27 by default, so the encoder needs 27 layers (36 real).
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, hidden=8, layers=27)).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patchify
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,  # 3 stacked layers x Qwen3's width 8 (3 x 2560 real)
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),  # (32, 32, 32, 32) real
        guidance_embeds=False,
    ).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=1024,
        use_quant_conv=True,
        use_post_quant_conv=True,
        batch_norm_eps=1e-4,
        batch_norm_momentum=0.1,
        patch_size=(2, 2),
    ).eval()
    return Flux2KleinPipeline(
        scheduler=published_scheduler("flux2_klein"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )


FAMILIES: dict[str, Callable[[], DiffusionPipeline]] = {
    "sdxl": build_sdxl,
    "sd3": build_sd3,
    "flux": build_flux,
    "qwen_image": build_qwen_image,
    "sana": build_sana,
    "pixart_sigma": build_pixart_sigma,
    "hunyuandit": build_hunyuandit,
    "lumina2": build_lumina2,
    "chroma": build_chroma,
    "z_image": build_z_image,
    "flux2_klein": build_flux2_klein,
}


def save_family(name: str, path: str | Path) -> Path:
    """Build family ``name`` and write it to ``path`` with ``save_pretrained`` (atomically: complete or absent).

    Args:
        name: A key of ``FAMILIES``.
        path: The pipeline folder to create; if another process creates it first, theirs is kept.

    Returns:
        ``path``, loadable with ``DiffusionPipeline.from_pretrained``.
    """
    from app.worker.pipelines import save_pipeline

    return save_pipeline(FAMILIES[name], path)
