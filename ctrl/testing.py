"""Tiny random Stable Diffusion (1.5 and 3) components built offline (nothing downloads), for tests and for
checking benchmark harnesses on a CPU (the same sizes diffusers' own tests use); and the second world of the
Gaussian closed-form checks, shared by the tests and benchmarks/closed_form.py."""

from __future__ import annotations

import json
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from ctrl.rewards.images import AestheticMLP


def _byte_tokenizer(directory: Path) -> dict[str, int]:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges), saved to ``directory``."""
    # byte-level BPE symbols (GPT-2's byte-to-unicode table: printable bytes stand for themselves)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {
        s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)
    tokenizer.save_pretrained(directory)
    return vocab


def make_tiny_sd(
    directory, seed: int = 0, unet: dict | None = None, vae: dict | None = None, text: dict | None = None
) -> str:
    """A random tiny Stable Diffusion pipeline saved in diffusers' layout (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), built offline: UNet2DConditionModel with block_out_channels (4, 8) on 8x8
    latents, a 2-block AutoencoderKL (factor 2, so 16x16 images), a 2-layer CLIPTextModel and a CLIP
    tokenizer whose vocabulary is the 256 byte symbols (no merges). ``unet``, ``vae``, ``text``: settings that
    replace those of each network (a larger workload for benchmarks/speed.py)."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tiny = dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2)  # both networks
    unet_config = dict(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, attention_head_dim=2)
    unet_config.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), **tiny)
    unet_config.update(up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **(unet or {}))
    UNet2DConditionModel(**unet_config).save_pretrained(directory / "unet")
    vae_config = dict(latent_channels=4, sample_size=16, **tiny)
    vae_config.update(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    AutoencoderKL(**{**vae_config, **(vae or {})}).save_pretrained(directory / "vae")
    vocab = _byte_tokenizer(directory / "tokenizer")
    text_config = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2)
    text_config.update(num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"])
    text_config.update(eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **(text or {}))
    CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(directory / "text_encoder")
    DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(directory / "scheduler")
    return str(directory)


def _t5_tokenizer(directory: Path, max_length: int) -> T5Tokenizer:
    """A T5 (Unigram) tokenizer whose vocabulary is T5's special tokens and the printable ASCII characters, each with
    and without the word-start marker, saved to ``directory`` (tokenizer.json: no sentencepiece model needed)."""
    chars = [chr(c) for c in range(33, 127)]
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + chars + ["\u2581" + c for c in chars]
    tokenizer = T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], extra_ids=0)
    tokenizer.model_max_length = max_length
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_tiny_sd3(directory, seed: int = 0, t5: bool = True, transformer: dict | None = None) -> str:
    """A random tiny Stable Diffusion 3 pipeline saved by ``StableDiffusion3Pipeline.save_pretrained`` (transformer/,
    vae/, text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/,
    model_index.json), built offline with the shapes of SD 3.5 medium scaled down: an SD3Transformer2DModel (2
    blocks, the first with SD 3.5's second attention, RMS qk-norm, patch 2) on 16-channel 8x8 latents, a 2-block
    AutoencoderKL of the SD3 kind (16 latent channels, no quant convs, shift_factor and scaling_factor; factor 2, so
    16x16 images), two 2-layer CLIPTextModelWithProjection on the byte-level CLIP tokenizer (16 tokens), a 2-layer
    T5EncoderModel on a character-level T5 tokenizer, and FlowMatchEulerDiscreteScheduler with SD3's shift 3.0.
    ``t5=False``: no text_encoder_3/tokenizer_3 (diffusers runs SD3 without T5, with zero T5 embeddings).
    ``transformer``: settings that replace those of the transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    directory = Path(directory)
    torch.manual_seed(seed)
    clip_dim, t5_dim, projection = 16, 32, 8  # SD3: CLIP-L 768 + CLIP-G 1280 = 2048 <= T5-XXL 4096
    transformer_config = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2)
    transformer_config.update(attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)
    transformer_config.update(joint_attention_dim=t5_dim, pooled_projection_dim=2 * projection, pos_embed_max_size=8)
    transformer_config.update(dual_attention_layers=(0,), qk_norm="rms_norm", **(transformer or {}))
    tiny = dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2)
    vae = AutoencoderKL(
        latent_channels=16,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,  # SD3's VAE
        scaling_factor=1.5305,
        **tiny,
    )
    with TemporaryDirectory() as scratch:
        vocab = _byte_tokenizer(Path(scratch))
        tokenizer = CLIPTokenizer.from_pretrained(scratch)
    text = dict(vocab_size=len(vocab), hidden_size=clip_dim, intermediate_size=32, num_hidden_layers=2)
    text.update(num_attention_heads=2, max_position_embeddings=16, projection_dim=projection)
    text.update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    text.update(pad_token_id=vocab["<|endoftext|>"])
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    text_encoder_3 = tokenizer_3 = None
    if t5:
        with TemporaryDirectory() as scratch:
            tokenizer_3 = _t5_tokenizer(Path(scratch), max_length=32)
        t5_config = T5Config(vocab_size=len(tokenizer_3), d_model=t5_dim, d_kv=8, d_ff=32, num_layers=2)
        t5_config.update(dict(num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))
        text_encoder_3 = T5EncoderModel(t5_config)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer_config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler_config
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(directory)
    return str(directory)


def make_tiny_aesthetic(directory, seed: int = 0) -> tuple[str, str]:
    """A random tiny CLIP image tower (CLIPVisionModelWithProjection, 16x16 input, 8-d projection) and a
    matching aesthetic MLP, saved locally: ``(clip_dir, mlp_path)``."""
    directory = Path(directory)
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=8,
        )
    ).save_pretrained(directory / "clip")
    mlp = AestheticMLP(8)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(directory / "mlp.safetensors"))
    return str(directory / "clip"), str(directory / "mlp.safetensors")


def make_tiny_clip(directory, seed: int = 0, logit_scale: float = 2.6592) -> str:
    """A random tiny CLIPModel with both towers (16x16 images, a 2-layer text tower on the byte-level tokenizer,
    8-d projection; ``logit_scale`` the log of the score's scale, CLIP's initial value by default) and its
    CLIPProcessor (16-pixel crops, CLIP's mean and std), saved in one directory, as CLIPScore and PickScore load
    them."""
    directory = Path(directory)
    torch.manual_seed(seed)
    vocab = _byte_tokenizer(directory)
    tokens = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, **tokens)
    text.update(num_attention_heads=2, max_position_embeddings=16, pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    vision.update(image_size=16, patch_size=4)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8, logit_scale_init_value=logit_scale)
    CLIPModel(config).save_pretrained(directory)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return str(directory)


# The closed-form checks' second Gaussian world (tests/test_gaussian.py, benchmarks/closed_form.py): another
# dimension, data mean and std, reward matrix, target, width and KL weight than configs/gaussian/*.yaml.
GAUSSIAN_OTHER_WORLD = [
    "--model.policy.dim",
    "3",
    "--model.policy.mean",
    "[-1.0, 0.5, 2.0]",
    "--model.policy.std",
    "1.3",
    "--model.reward.A",
    "[[0.5, -1.0, 0.0], [1.0, 1.0, 0.5]]",
    "--model.reward.y",
    "[0.0, 2.0]",
    "--model.reward.sigma",
    "0.7",
    "--model.algorithm.alpha",
    "0.5",
]
# RAFT's self-normalised weights are biased by about 1 / (effective sample size): on that world (a stronger
# tilt) its covariance error was 0.055 with 256 chains and 0.036 with 1,024, which its checks use.
GAUSSIAN_LARGER_ROLLOUT = {"raft": ["--data.batch_size", "1024", "--model.algorithm.minibatch_size", "1024"]}
