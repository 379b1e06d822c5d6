"""Helpers for the processor tests: real media, a small tokenizer with the real special-token ids, the oracle.

The tokenizer is a byte-level BPE without merges (one token per byte) whose vocabulary also places the
Qwen3-Omni special tokens at their released ids, so prompts tokenise to the ids the real model would see
around every placeholder. `make_checkpoint_folder` writes it with the official chat template and the
released `preprocessor_config.json`, the files a checkpoint folder ships.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import soundfile

from qwen3omni.demo import NAMED_TOKENS, ROLE_IDS, SPECIAL_IDS, byte_level_tokenizer  # noqa: F401

DATA = Path(__file__).resolve().parent / "data"
SPEECH = DATA / "speech_librivox_16k.flac"  # LibriVox (public domain), 7.1 s, 16 kHz mono
PHOTO = DATA / "photo_chelsea_333x221.jpg"  # scikit-image "chelsea" (CC0), 333 x 221
VIDEO = DATA / "video_coffee_speech.mp4"  # scikit-image "coffee" (CC0) pan, 12 fps, 50 frames, AAC speech
TEMPLATE = DATA / "qwen3_omni_thinking_chat_template.json"
PREPROCESSOR = DATA / "preprocessor_config.json"

def speech() -> np.ndarray:
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    assert rate == 16000
    return samples


def official_template() -> str:
    return json.loads(TEMPLATE.read_text())["chat_template"]


def write_tokenizer(folder: Path, role_tokens: bool = False) -> None:
    """The demo's byte-level tokenizer (special tokens at their released ids), saved as a checkpoint ships it.
    `role_tokens` also makes "system", "user" and "assistant" single tokens at their released ids."""
    byte_level_tokenizer(role_tokens).save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(NAMED_TOKENS)  # as the released tokenizer_config.json names its placeholders
    config_file.write_text(json.dumps(config, indent=1))


def make_checkpoint_folder(folder: Path, template: bool = True, role_tokens: bool = False) -> Path:
    """Tokenizer files, chat_template.json and preprocessor_config.json, as a released folder has them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, role_tokens)
    if template:
        shutil.copy(TEMPLATE, folder / "chat_template.json")
    shutil.copy(PREPROCESSOR, folder / "preprocessor_config.json")
    return folder


def oracle_processor(folder: Path):
    """transformers' Qwen3OmniMoeProcessor with the checkpoint's settings and the PIL-backed image processor
    (the one the released preprocessor_config.json named when the model shipped)."""
    from transformers import AutoTokenizer, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen3OmniMoeProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(str(folder)),
            video_processor=Qwen2VLVideoProcessor.from_pretrained(str(folder), cap_pixels_per_frame=False),
            feature_extractor=WhisperFeatureExtractor.from_pretrained(str(folder)),
            tokenizer=AutoTokenizer.from_pretrained(str(folder)),
            chat_template=official_template(),
        )


def oracle_feature_extractor():
    """WhisperFeatureExtractor as the released preprocessor_config.json builds it."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor.from_pretrained(str(DATA))


def oracle_features(waveforms):
    """The reference log-mel as Qwen3OmniMoeProcessor calls it: pad to longest, no truncation, with mask."""
    out = oracle_feature_extractor()(
        [np.asarray(w, dtype=np.float32) for w in waveforms], sampling_rate=16000, padding=True,
        truncation=False, return_attention_mask=True, return_tensors="pt",
    )
    return out["input_features"], out["attention_mask"]
