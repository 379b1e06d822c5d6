"""The whole Processor against transformers' Qwen3OmniMoeProcessor built with the same tokenizer and template."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import soxr
import torch
from processor_fixtures import PHOTO, SPEECH, VIDEO, make_checkpoint_folder, oracle_processor, speech

from qwen3omni.errors import ConfigError, InputError, MissingFileError
from qwen3omni.processing import Processor, read_audio_track, read_video
from qwen3omni.processing.chat import normalize_conversations, render_builtin

TOLERANCE = {"input_features": 1e-4, "pixel_values": 1e-6, "pixel_values_videos": 1e-5}
ROOT = Path(__file__).resolve().parents[1]
SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
          "auditory and visual inputs, as well as generating text and speech.")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_checkpoint_folder(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def ours(folder) -> Processor:
    return Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def oracle(folder):
    return oracle_processor(folder)


@pytest.fixture(scope="module")
def video_inputs():
    """What our processor reads from the mp4 (2 fps), handed to the oracle as decoded frames and track."""
    return read_video(VIDEO).permute(0, 2, 3, 1).numpy(), read_audio_track(VIDEO).numpy()


def _oracle_call(oracle, texts, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oracle(text=texts, padding=True, return_tensors="pt", videos_kwargs={"fps": 2.0}, **kwargs)


def _assert_same(out: dict, ref, interleaved: bool = False):
    keys = set(out) - {"use_audio_in_video"}
    assert keys == set(ref.keys()), (sorted(keys), sorted(ref.keys()))
    assert out.get("use_audio_in_video", False) == interleaved
    for key in keys:
        got, want = out[key], ref[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, want.dtype, got.shape, want.shape)
        if key in TOLERANCE:
            diff = (got - want).abs().max().item()
            assert diff <= TOLERANCE[key], f"{key} differs by {diff}"
        else:
            assert torch.equal(got, want), key


def _render(oracle, conversations):
    return oracle.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)


def test_text_only(ours, oracle):
    conv = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Hello! Grüße, 你好 — who are you?"}]
    text = _render(oracle, conv)
    assert ours.apply_chat_template(conv) == text
    _assert_same(ours(conv), _oracle_call(oracle, [text]))


def test_audio_and_text(ours, oracle):
    conv = [{"role": "user", "content": [{"type": "audio", "audio": str(SPEECH)},
                                         {"type": "text", "text": "Transcribe the recording."}]}]
    out = ours(conv)
    _assert_same(out, _oracle_call(oracle, [_render(oracle, conv)], audio=[speech()]))
    audio_id = ours.tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    assert int((out["input_ids"] == audio_id).sum()) == 93  # 710 mel frames: 7 full chunks of 13, then 2


def test_image_and_text(ours, oracle):
    conv = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "image", "image": str(PHOTO)},
                                         {"type": "text", "text": "What animal is this?"}]}]
    out = ours(conv)
    _assert_same(out, _oracle_call(oracle, [_render(oracle, conv)], images=[PIL.Image.open(PHOTO)]))
    image_id = ours.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == image_id).sum()) == 14 * 20 // 4
    openai_style = [conv[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(PHOTO)}},
                                                          {"type": "text", "text": "What animal is this?"}]}]
    assert all(torch.equal(v, out[k]) for k, v in ours(openai_style).items())


def test_video_with_audio_in_video(ours, oracle, video_inputs):
    frames, track = video_inputs
    conv = [{"role": "user", "content": [{"type": "video", "video": str(VIDEO)},
                                         {"type": "text", "text": "What is said while the cup is shown?"}]}]
    out = ours(conv, use_audio_in_video=True)
    ref = _oracle_call(oracle, [_render(oracle, conv)], videos=[frames], audio=[track],
                       audio_from_video_indices=[0], use_audio_in_video=True)
    _assert_same(out, ref, interleaved=True)
    assert out["video_second_per_grid"].tolist() == [1.0]
    tokens = ours.settings.tokens
    ids = out["input_ids"][0].tolist()
    audio_id, video_id = (ours.tokenizer.convert_tokens_to_ids(t) for t in (tokens.audio, tokens.video))
    run = ids[ids.index(ours.tokenizer.convert_tokens_to_ids(tokens.audio_start)) + 1:]
    kinds = "".join("a" if i == audio_id else "v" for i in run[: run.index(151670)])
    assert "va" in kinds and "av" in kinds  # genuinely interleaved, not one block after the other
    # The same through the rendered-text API, with decoded frames and a track passed in (44.1 kHz stereo).
    track_44k = np.stack([soxr.resample(track, 16000, 44100)] * 2)
    again = ours.process(_render(oracle, conv), videos=[frames], video_audio=[(track_44k, 44100)],
                         use_audio_in_video=True, fps=2.0)
    assert again.keys() == out.keys() and torch.equal(again["input_ids"], out["input_ids"])
    assert torch.equal(again["feature_attention_mask"], out["feature_attention_mask"])
    assert (again["input_features"] - out["input_features"]).abs().mean() < 0.01  # resampled there and back


def test_video_without_its_audio(ours, oracle, video_inputs):
    frames, _ = video_inputs
    conv = [{"role": "user", "content": [{"type": "video", "video": str(VIDEO)}, {"type": "text", "text": "?"}]}]
    _assert_same(ours(conv), _oracle_call(oracle, [_render(oracle, conv)], videos=[frames]))


def test_two_conversation_batch(ours, oracle, video_inputs):
    frames, track = video_inputs
    first = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": [{"type": "image", "image": str(PHOTO)},
                                          {"type": "audio", "audio": str(SPEECH)},
                                          {"type": "text", "text": "Does the recording describe the picture?"}]}]
    second = [{"role": "user", "content": [{"type": "video", "video": str(VIDEO)},
                                           {"type": "text", "text": "Describe the video."}]},
              {"role": "assistant", "content": "A cup of espresso on a saucer."},
              {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                           {"type": "image", "image": np.asarray(PIL.Image.open(PHOTO))[::2, ::3]}]}]
    out = ours([first, second], use_audio_in_video=True)
    texts = _render(oracle, [first, second])
    assert ours.apply_chat_template([first, second]) == texts
    images = [PIL.Image.open(PHOTO), np.asarray(PIL.Image.open(PHOTO))[::2, ::3]]
    ref = _oracle_call(oracle, texts, images=images, videos=[frames], audio=[speech(), track],
                       audio_from_video_indices=[None, 0], use_audio_in_video=True)
    _assert_same(out, ref, interleaved=True)
    mask = out["attention_mask"]
    assert mask[:, -1].all() and not mask.all()  # left padded
    short = int(mask.sum(-1).argmin())
    assert (out["input_ids"][short, : int((mask[short] == 0).sum())] == ours.tokenizer.pad_token_id).all()


def test_rendered_text_api_matches_reference(ours, oracle):
    texts = ["<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>hi<|im_end|>\n",
             "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|audio_start|><|audio_pad|>"
             "<|audio_end|><|im_end|>\n<|im_start|>assistant\n"]
    clips = [speech()[:40000], speech()[5000:]]
    out = ours.process(texts, images=[str(PHOTO)], audio=clips)
    _assert_same(out, _oracle_call(oracle, texts, images=[PIL.Image.open(PHOTO)], audio=clips))


# ---------------------------------------------------------------------------------------------------------------
# Chat template

CONVERSATION_SHAPES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
     {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "image", "image": "b.png"},
                                  {"type": "video", "video": "c.mp4"}, {"type": "text", "text": "What?"}]}],
    [{"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "Describe."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
     {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]}],
    [{"role": "user", "content": "First question"}, {"role": "assistant", "content": "First answer"},
     {"role": "system", "content": "Now answer in French."}, {"role": "user", "content": "Second question"}],
]


@pytest.mark.parametrize("shape", range(len(CONVERSATION_SHAPES)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_builtin_template_renders_like_the_official_one(oracle, shape, generation_prompt):
    conv = CONVERSATION_SHAPES[shape]
    official = oracle.apply_chat_template(conv, add_generation_prompt=generation_prompt, tokenize=False)
    checked, _ = normalize_conversations(conv)
    assert render_builtin(checked[0], generation_prompt) == official


def test_folder_without_template_uses_the_builtin_one(tmp_path, ours):
    bare = Processor.from_pretrained(make_checkpoint_folder(tmp_path / "bare", template=False))
    assert bare.chat_template is None
    conv = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}, {"type": "text", "text": "?"}]}]
    a, b = bare(conv), ours(conv)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Loading, decoding, errors


def test_config_json_supplies_model_settings(tmp_path):
    folder = make_checkpoint_folder(tmp_path / "with_config")
    config = json.loads((ROOT / "configs" / "tiny.json").read_text())
    config["thinker_config"]["audio_config"]["n_window"] = 25
    config["thinker_config"]["audio_config"]["n_window_infer"] = 50
    config["thinker_config"]["position_id_per_seconds"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    settings = Processor.from_pretrained(folder).settings
    assert (settings.n_window, settings.position_id_per_seconds) == (25, 7.0)
    config["thinker_config"]["image_token_id"] = 151654
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="maps <\\|image_pad\\|> to id 151655, but config.json says"):
        Processor.from_pretrained(folder)


def test_decode(ours):
    out = ours([[{"role": "user", "content": "Grüße!"}], [{"role": "user", "content": "A longer question?"}]])
    assert ours.decode(out["input_ids"][1]) == "<|im_start|>user\nA longer question?<|im_end|>\n<|im_start|>assistant\n"
    assert ours.batch_decode(out["input_ids"], skip_special_tokens=True) == ["user\nGrüße!\nassistant\n",
                                                                            "user\nA longer question?\nassistant\n"]


def test_conversation_errors_name_the_item(ours, tmp_path):
    def user(*items):
        return [{"role": "user", "content": list(items)}]

    cases = [
        (user({"type": "pdf", "pdf": "x.pdf"}), InputError, "conversation 0, message 0, item 0: unknown content type"),
        (user({"type": "image"}), InputError, "message 0, item 0: a image item needs its data"),
        (user({"type": "image", "image": "https://example.com/a.png"}), InputError, "URLs and inline data"),
        ([{"role": "tool", "content": "{}"}], InputError, "message 0: unknown role 'tool'"),
        ([{"role": "user", "content": 5}], InputError, "'content' must be a string or a list"),
        (user({"type": "audio", "audio": str(tmp_path / "gone.wav")}), MissingFileError,
         r"conversation 0, message 0, item 0 \(audio\): audio file .*gone.wav"),
        (user({"type": "audio", "audio": np.zeros(0, np.float32)}), InputError,
         r"item 0 \(audio\): the audio is empty"),
        (user({"type": "image", "image": np.zeros((0, 3, 3), np.uint8)}), InputError, r"item 0 \(image\): .*empty"),
        (user({"type": "video", "video": np.zeros((0, 8, 8, 3), np.uint8)}), InputError,
         r"item 0 \(video\): the video has no frames"),
        (user({"type": "text", "text": "typed <|image_pad|> by hand"}), InputError,
         r"image: the prompt has 1 <\|image_pad\|> placeholder\(s\) but 0 image input\(s\)"),
    ]
    for conv, error, message in cases:
        with pytest.raises(error, match=message):
            ours(conv)
    with pytest.raises(InputError, match="conversations: expected a non-empty list"):
        ours([])
    with pytest.raises(InputError, match=r"videos\[0\]: fps must be a positive number"):
        ours.process("<|video_pad|>", videos=[np.zeros((2, 32, 32, 3), np.uint8)], fps=0)


def test_template_without_placeholders_is_caught(ours):
    no_media = Processor(ours.tokenizer, "{% for m in messages %}{{ m.role }}{% endfor %}", ours.settings)
    conv = [{"role": "user", "content": [{"type": "image", "image": str(PHOTO)}]}]
    with pytest.raises(InputError, match="the prompt has 0 <\\|image_pad\\|> placeholder\\(s\\) but 1 image"):
        no_media(conv)
    with pytest.raises(InputError, match="audio: the prompt has 1 .* but 2 audio"):
        ours.process("<|audio_pad|>", audio=[speech(), speech()])


def test_loading_errors(tmp_path):
    with pytest.raises(MissingFileError, match="is not a folder"):
        Processor.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="has no tokenizer files"):
        Processor.from_pretrained(tmp_path / "empty")
    folder = make_checkpoint_folder(tmp_path / "dither")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, "dither": 0.5}))
    with pytest.raises(ConfigError, match="dither"):
        Processor.from_pretrained(folder)
    shutil.rmtree(folder)


def test_gpu_outputs_match_cpu(ours):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": str(SPEECH)},
                                         {"type": "video", "video": str(VIDEO)}, {"type": "text", "text": "?"}]}]
    cpu, gpu = ours(conv, use_audio_in_video=True), ours(conv, use_audio_in_video=True, device="cuda")
    assert gpu["input_features"].is_cuda and gpu.keys() == cpu.keys()
    assert torch.equal(gpu["input_ids"].cpu(), cpu["input_ids"])
    assert (gpu["input_features"].cpu() - cpu["input_features"]).abs().max() <= 1e-4
    assert (gpu["pixel_values_videos"].cpu() - cpu["pixel_values_videos"]).abs().max() <= 1e-5
