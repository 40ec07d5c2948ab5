"""Tiny random text-to-image pipelines built from config (SD-style and SDXL-style), saved as
diffusers pipeline folders: UNet2DConditionModel, AutoencoderKL, CLIP text encoder(s) and an
offline byte-level CLIP tokenizer (no hub). Seconds to build; used by tests/test_t2i*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TOKEN_LENGTH = 16  # the tokenizers' model_max_length (SD uses 77; shorter keeps the tests fast)
TEXT_HIDDEN = 16
LATENT_SIZE = 8  # latents 4x8x8, images 3x16x16 (the VAE downsamples by 2)

SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


def byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols (printable bytes as themselves, the rest shifted past 255)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_clip_vocab(folder: Path) -> dict[str, int]:
    """``vocab.json`` (byte symbols, each also with ``</w>``, plus start/end tokens) and an empty ``merges.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    syms = byte_symbols()
    vocab = {s: i for i, s in enumerate(syms)} | {s + "</w>": len(syms) + i for i, s in enumerate(syms)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def tiny_tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=TOKEN_LENGTH)


def make_tiny_clip(out: str | Path, image_size: int = 16, max_positions: int = TOKEN_LENGTH) -> Path:
    """A tiny random ``CLIPModel`` (seeded) saved with the offline byte-level CLIP tokenizer beside it:
    a local CLIP folder for the CLIP score and SwiftBrush's CLIP loss."""
    from transformers import CLIPConfig, CLIPModel

    out = Path(out)
    vocab = write_clip_vocab(out)
    eos = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=max_positions, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(out, safe_serialization=True)
    return out


def tiny_text_config(vocab_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, **extra,
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=2 * LATENT_SIZE,
    )


def tiny_unet(cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **extra,
    )


def make_tiny_sd(out: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny random SD1.5-style pipeline folder (``StableDiffusionPipeline``, DDIM scheduler config)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(len(tok))),
        tokenizer=tok,
        unet=tiny_unet(TEXT_HIDDEN),
        scheduler=DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_t2v(out: str | Path, seed: int = 0) -> Path:
    """A tiny random text-to-video pipeline folder (``TextToVideoSDPipeline``: SD's parts with a
    ``UNet3DConditionModel``, latents 4 x F x 8 x 8, DDIM scheduler config)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextModel

    out = Path(out)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    unet = UNet3DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=4,
    )
    pipe = TextToVideoSDPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(tiny_text_config(len(tok))), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_roberta_vocab(folder: Path) -> dict[str, int]:
    """An offline byte-level RoBERTa tokenizer's ``vocab.json`` (``<s>``, ``<pad>``, ``</s>``, ``<unk>``, the 256 byte
    symbols, ``<mask>``) and an empty ``merges.txt``: what ``RobertaTokenizer.from_pretrained`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab |= {s: len(vocab) + i for i, s in enumerate(byte_symbols())}
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return vocab


AUDIO_MELS = 16  # the vocoder's mel bins: latents 4 x 8 x 8 (16 frames x 16 bins, the VAE downsamples by 2)


def tiny_clap_audio_config() -> dict:
    """A tiny CLAP audio tower (HTSAT) that reads ``ClapFeatureExtractor``'s default 64-bin features."""
    return dict(num_mel_bins=64, spec_size=256, patch_size=4, patch_stride=[4, 4], patch_embeds_hidden_size=8, hidden_size=16,
                depths=[1, 1], num_attention_heads=[2, 2], window_size=8, projection_dim=8, enable_fusion=False)


def make_tiny_audioldm(out: str | Path, seed: int = 0, music: bool = False) -> Path:
    """A tiny random text-to-audio pipeline folder (``AudioLDMPipeline``): a CLAP text encoder with projection and an
    offline RoBERTa tokenizer, a UNet taking the text embedding as ``class_labels`` (``simple_projection``,
    concatenated to the time embedding; no cross-attention context), a one-channel mel VAE, a HiFi-GAN vocoder
    (16 mel bins, 16x upsampling at 8 kHz: 16 frames are 256 samples, 0.032 s) and a DDIM scheduler config.
    ``music``: a ``MusicLDMPipeline`` folder instead: a whole ``ClapModel`` as the text encoder, with CLAP's
    feature extractor."""
    import tempfile

    from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, RobertaTokenizer, SpeechT5HifiGan, SpeechT5HifiGanConfig

    out = Path(out)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_roberta_vocab(Path(tmp))
        tok = RobertaTokenizer.from_pretrained(tmp, model_max_length=TOKEN_LENGTH)
    projection = 8
    text = ClapTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH + 2, type_vocab_size=1, bos_token_id=0, pad_token_id=1, eos_token_id=2, projection_dim=projection,
    )
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(8, 16), attention_head_dim=4, norm_num_groups=4,  # (self-attention: no context is given)
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=projection, class_embeddings_concat=True,
    )
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=2 * LATENT_SIZE,
    )
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=AUDIO_MELS, sampling_rate=8000, upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
    ))
    if music:
        from diffusers import MusicLDMPipeline
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

        clap = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=tiny_clap_audio_config(), projection_dim=projection))
        pipe = MusicLDMPipeline(vae=vae, text_encoder=clap, tokenizer=tok, feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"),
                                unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER), vocoder=vocoder)
    else:
        pipe = AudioLDMPipeline(
            vae=vae, text_encoder=ClapTextModelWithProjection(text), tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
            vocoder=vocoder,
        )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def make_tiny_sdxl(out: str | Path, seed: int = 0) -> Path:
    """A tiny random SDXL-style pipeline folder: two text encoders (the second with a projection:
    pooled embeddings), ``addition_embed_type="text_time"`` (pooled embeddings and time ids)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    projection = 8
    time_dim = 4
    unet = tiny_unet(
        2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=projection + 6 * time_dim,
        transformer_layers_per_block=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(len(tok), projection_dim=projection)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k not in ("clip_sample", "set_alpha_to_one")}),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


#: The training prompts of the text-to-image tests (the ``prompt_file`` fixture).
PROMPTS = ["a red cube", "a blue ball", "two green cats", "a yellow house"]


def write_prompts(path: str | Path, prompts: list[str] | None = None) -> Path:
    path = Path(path)
    path.write_text("\n".join(prompts or PROMPTS) + "\n")
    return path


def write_image_folder(folder: str | Path, n: int = 6, size: int = 2 * LATENT_SIZE, seed: int = 0) -> Path:
    """PNG images with captions in ``metadata.jsonl`` (``file_name``, ``text``)."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
        lines.append(json.dumps({"file_name": f"img_{i}.png", "text": f"picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# ------------------------------------------------------------------ SD3-style (flow matching)

SD3_JOINT_DIM = 40  # the T5 width; the CLIP embeddings (2 x 16) are zero-padded to it, as SD3 does
SD3_PROJECTION = 8  # each CLIP encoder's projection; pooled_projections is both, concatenated
SD3_SHIFT = 3.0


def tiny_t5_tokenizer():
    """An offline T5 tokenizer: a unigram model over printable ASCII characters (``tokenizers``),
    with ``<pad>`` 0, ``</s>`` 1 (appended to every sequence, as T5's is) and ``<unk>`` 2."""
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(chr(c), -2.0) for c in range(32, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(f"{tmp}/tokenizer.json")
        return T5TokenizerFast(tokenizer_file=f"{tmp}/tokenizer.json", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def tiny_sd3_vae():
    """``tiny_vae`` with SD3's latent shift (``z = (E(x) - shift_factor) * scaling_factor``)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=2 * LATENT_SIZE, shift_factor=0.0609, scaling_factor=1.5305,
    )


def tiny_sd3_transformer(num_layers: int = 2):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=SD3_JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * SD3_PROJECTION, pos_embed_max_size=8,
    )


def make_tiny_sd3(out: str | Path, seed: int = 0, t5: bool = False) -> Path:
    """A tiny random SD3-style pipeline folder (``StableDiffusion3Pipeline``): a 2-layer
    ``SD3Transformer2DModel``, a VAE with a shift factor, two CLIP encoders with projections, a
    ``FlowMatchEulerDiscreteScheduler`` (shift 3), and a tiny T5 encoder (``t5=True``) or none
    (``text_encoder_3`` / ``tokenizer_3`` null: the pipeline uses zeros in their place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = Path(out)
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    t5_parts = dict(text_encoder_3=None, tokenizer_3=None)
    if t5:
        tok3 = tiny_t5_tokenizer()
        config = T5Config(vocab_size=len(tok3), d_model=SD3_JOINT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        t5_parts = dict(text_encoder_3=T5EncoderModel(config), tokenizer_3=tok3)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SHIFT),
        vae=tiny_sd3_vae(),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(len(tok), projection_dim=SD3_PROJECTION)),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(len(tok), projection_dim=SD3_PROJECTION)),
        tokenizer_2=tok,
        **t5_parts,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# Fixtures the text-to-image test modules share (imported there by name).


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.txt", PROMPTS)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(autouse=True)
def latent_cache_in_tmp(tmp_path, monkeypatch):
    """Each test's VAE-latent cache in its own tmp folder."""
    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path / "cache"))
