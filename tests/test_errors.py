"""Every public entry point with bad input (issue 9): the right error type, a message that names the argument,
the value received and what was expected, and no state left behind (files, caches, decoders, the next call).

Checked elsewhere and not repeated here (those tests call the same code one level lower):
- config fields by key path, inconsistent values, unreadable files: tests/test_config.py
  (test_missing_required_field_names_its_path, test_ill_typed_field_names_its_path, ...)
- `checkpoint.load_state`: missing / unexpected / mis-shaped tensors, missing shard, truncated file, pickle-only
  folder, shard size, interrupted `save_checkpoint`: tests/test_checkpoint.py
- conversations and media: tests/test_processor.py::test_conversation_errors_name_the_item, ::test_loading_errors;
  tests/test_processing_audio.py::test_errors_name_the_item; tests/test_processing_vision.py::
  test_image_errors_name_the_item, ::test_video_errors_name_the_item
- encoders: tests/test_audio_encoder.py::test_bad_inputs_raise_input_errors,
  tests/test_vision_encoder.py::test_bad_inputs_raise_input_errors
- position ids: tests/test_positions.py::test_placeholder_count_mismatch_is_an_input_error, ::test_missing_grid_...
- Code2Wav codes: tests/test_code2wav.py::test_bad_codes_raise_input_error, ::test_bad_chunk_arguments_...,
  tests/test_code2wav_streaming.py::test_push_validates_codes
- generate: tests/test_generation.py::test_bad_knobs, ::test_speakers, ::test_thinker_only_checkpoint_...
Here the same failures are reached through the public API (`Qwen3Omni.from_pretrained`, `Processor`,
`model.thinker(**batch)`, `generate`, `stream`, `code2wav`, `save_pretrained`, the command line).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from processor_fixtures import make_checkpoint_folder

from qwen3omni.cli import main as cli_main
from qwen3omni.demo import random_init_, synthetic_image, synthetic_speech, tiny_config
from qwen3omni.errors import CheckpointError, ConfigError, InputError, MissingFileError, Qwen3OmniError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.processing import Processor

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def raises(kind, *fragments: str):
    """pytest.raises(kind) whose message must contain every fragment (argument, value, expectation)."""
    assert issubclass(kind, Qwen3OmniError)
    with pytest.raises(kind) as info:
        yield info
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"


def snapshot(folder: Path) -> dict:
    """Every file under `folder` and next to it, with its bytes: what a failed call must leave as it was."""
    found = {}
    for p in sorted(folder.parent.rglob("*")):
        found[p.relative_to(folder.parent).as_posix()] = p.read_bytes() if p.is_file() else None
    return found


def user(*items):
    return [{"role": "user", "content": list(items)}]


TEXT = {"type": "text", "text": "Hi"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny model (random weights, configs/tiny.json) saved with tokenizer, template and preprocessor files."""
    path = tmp_path_factory.mktemp("errors") / "tiny"
    torch.manual_seed(0)
    random_init_(Qwen3Omni(tiny_config()), seed=0).save_pretrained(path)
    return make_checkpoint_folder(path, role_tokens=True)


@pytest.fixture(scope="module")
def model(folder):
    return Qwen3Omni.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def mm_batch(processor):
    """audio + image + video + text, the processor's output."""
    video = np.stack([synthetic_image(64, 64)] * 4)
    conversation = user({"type": "audio", "audio": synthetic_speech(1.0)},
                        {"type": "image", "image": synthetic_image()}, {"type": "video", "video": video}, TEXT)
    return processor(conversation)


# ---- loading: Qwen3Omni.from_pretrained ---------------------------------------------------------------------------
def small_checkpoint(root: Path, name: str = "ckpt", **save_kw) -> Path:
    """A small full checkpoint (vocabularies cut down; token ids do not matter for loading)."""
    cfg = tiny_config().to_dict()
    cfg["thinker_config"]["text_config"]["vocab_size"] = 512
    from qwen3omni.config import Qwen3OmniConfig

    model = Qwen3Omni(Qwen3OmniConfig.from_dict(cfg))
    path = root / name
    model.save_pretrained(path, **save_kw)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("small"), max_shard_size="8MB")


def copy_of(small: Path, tmp_path: Path) -> Path:
    target = tmp_path / "case" / "ckpt"
    shutil.copytree(small, target)
    return target


def _load_fails(path: Path, kind, *fragments, **kw):
    before = snapshot(path)
    with raises(kind, *fragments):
        Qwen3Omni.from_pretrained(path, **kw)
    assert snapshot(path) == before, "a failed load changed files"


def test_folder_without_config_json(tmp_path):
    path = tmp_path / "weights_only" / "ckpt"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    _load_fails(path, MissingFileError, "has no config.json", str(path))
    _load_fails(tmp_path / "weights_only", MissingFileError, "has no config.json")
    with raises(MissingFileError, "does not exist", "nowhere"):
        Qwen3Omni.from_pretrained(tmp_path / "nowhere")


def test_config_missing_or_ill_typed_field(small, tmp_path):
    path = copy_of(small, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["thinker_config"]["text_config"]["num_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    _load_fails(path, ConfigError, "thinker_config.text_config.num_experts", "required field is missing", "int")
    cfg["thinker_config"]["text_config"]["num_experts"] = "8"
    (path / "config.json").write_text(json.dumps(cfg))
    _load_fails(path, ConfigError, "thinker_config.text_config.num_experts", "expected int", "'8'")


def test_index_naming_a_missing_shard(small, tmp_path):
    path = copy_of(small, tmp_path)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    _load_fails(path, CheckpointError, "model.safetensors.index.json", shards[-1].name, "not in the folder")


def test_truncated_safetensors(small, tmp_path):
    path = copy_of(small, tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    _load_fails(path, CheckpointError, shard.name, "truncated")


def _rewrite_tensor(path: Path, name: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / index[name]
    tensors = load_file(shard)
    tensors[name] = value
    save_file(tensors, shard)


def test_wrong_tensor_shape_or_dtype(small, tmp_path):
    path = copy_of(small, tmp_path)
    name = "thinker.model.norm.weight"
    _rewrite_tensor(path, name, torch.ones(63))
    _load_fails(path, CheckpointError, name, "expected [64]", "found [63]")
    _rewrite_tensor(path, name, torch.ones(64, dtype=torch.int32))
    _load_fails(path, CheckpointError, name, "int32", "floating-point")


def _rewrite_header(shard: Path, edit) -> None:
    """Rewrite a safetensors header (valid JSON, wrong content), keeping the data bytes."""
    import struct

    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8 : 8 + n]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _entry(name: str, **change):
    def edit(header):
        header[name] = {**header[name], **change} if change else 5
        return header

    return edit


@pytest.mark.parametrize("how", ["not an object", "entry not an object", "dtype and offsets disagree"])
def test_corrupted_safetensors_header(small, tmp_path, how):
    path = copy_of(small, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "thinker.model.norm.weight"
    edit = {"not an object": lambda h: [1, 2], "entry not an object": _entry(name),
            "dtype and offsets disagree": _entry(name, dtype="F16")}[how]
    _rewrite_header(path / index[name], edit)
    _load_fails(path, CheckpointError, index[name])


def test_components_naming_an_unknown_part(small):
    with raises(InputError, "components", "vocoder", "['thinker', 'talker', 'code2wav']"):
        Qwen3Omni.from_pretrained(small, components={"thinker", "vocoder"})


def test_components_not_in_a_thinker_only_checkpoint(small, tmp_path):
    Qwen3Omni.from_pretrained(small, components={"thinker"}).save_pretrained(tmp_path / "thinking")
    with raises(InputError, "components", "['talker']", "no speech output", "available: ['thinker']"):
        Qwen3Omni.from_pretrained(tmp_path / "thinking", components={"thinker", "talker"})


def test_components_of_the_wrong_type(small):
    with raises(InputError, "components", "5"):
        Qwen3Omni.from_pretrained(small, components=5)


def test_dtype_by_name_or_invalid(small):
    assert Qwen3Omni.from_pretrained(small, dtype="bfloat16").thinker.lm_head.weight.dtype == torch.bfloat16
    with raises(InputError, "dtype", "'float17'"):
        Qwen3Omni.from_pretrained(small, dtype="float17")


def test_device_that_does_not_exist(small):
    with raises(InputError, "device", "'cuda:99'"):
        Qwen3Omni.from_pretrained(small, device="cuda:99")


def test_model_from_something_that_is_not_a_config():
    with raises(InputError, "config", "Qwen3OmniConfig", "{'thinker_config': {}}"):
        Qwen3Omni({"thinker_config": {}})


# ---- the processor ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "item,fragments",
    [
        ({"type": "audio", "audio": np.zeros(0, np.float32)}, ["item 0 (audio)", "empty", "0 samples"]),
        ({"type": "audio", "audio": np.full(800, np.nan, np.float32)}, ["item 0 (audio)", "800 NaN"]),
        ({"type": "audio", "audio": np.zeros((3, 800), np.float32)}, ["item 0 (audio)", "3 channels", "[3, 800]",
                                                                       "mono or stereo"]),
        ({"type": "audio", "audio": [[0.0, 1.0], [0.5]]}, ["item 0 (audio)", "ragged"]),
        ({"type": "image", "image": np.zeros((0, 12, 3), np.uint8)}, ["item 0 (image)", "empty", "[0, 12, 3]"]),
        ({"type": "video", "video": np.zeros((0, 32, 32, 3), np.uint8)}, ["item 0 (video)", "no frames"]),
        ({"type": "video", "video": []}, ["item 0 (video)", "no frames"]),
        ({"type": "hologram", "hologram": 1}, ["message 0, item 0", "'hologram'", "'text', 'audio', 'image'"]),
    ],
)
def test_bad_media_in_a_conversation(processor, item, fragments):
    good = processor(user(TEXT))
    with raises(InputError, *fragments):
        processor(user(item, TEXT))
    again = processor(user(TEXT))
    assert all(torch.equal(good[k], again[k]) for k in good), "a failed call changed the processor"


def test_placeholder_count_not_matching_the_media_at_the_processor(processor):
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" * 2 + "<|im_end|>\n"
    with raises(InputError, "image", "2 <|image_pad|> placeholder(s)", "1 image input(s)"):
        processor.process(prompt, images=[synthetic_image()])
    with raises(InputError, "audio", "0 <|audio_pad|> placeholder(s)", "1 audio input(s)"):
        processor.process("no placeholder", audio=[synthetic_speech(0.5)])


def test_process_arguments(processor):
    with raises(InputError, "text", "a string or a non-empty list of strings", "5"):
        processor.process(5)
    with raises(InputError, "images", "expected a list", "ndarray(shape=[64, 96, 3]"):
        processor.process("<|image_pad|>", images=synthetic_image())
    with raises(InputError, "audio", "expected a list", "ndarray(shape=[8000]"):
        processor.process("<|audio_pad|>", audio=synthetic_speech(0.5))
    with raises(InputError, "device", "'gpu7'"):
        processor(user(TEXT), device="gpu7")


# ---- model.thinker(**batch) ---------------------------------------------------------------------------------------
def with_(batch, **changes):
    out = {k: v for k, v in batch.items() if k not in changes}
    out.update({k: v for k, v in changes.items() if v is not None})
    return out


def test_placeholder_count_not_matching_the_media_at_the_thinker(model, mm_batch):
    ids = mm_batch["input_ids"]
    image_at = int((ids[0] == model.config.thinker.image_token_id).nonzero()[0])
    fewer = ids.clone()
    fewer[0, image_at] = 100  # one image placeholder less than the encoder's features
    with raises(InputError, "image", "5 image placeholder tokens", "6 features"):
        model.thinker(**with_(mm_batch, input_ids=fewer))
    with raises(InputError, "input_features", "13 audio placeholder tokens", "input_features is None"):
        model.thinker(**{k: v for k, v in mm_batch.items() if k not in ("input_features", "feature_attention_mask")})
    no_pixels = {k: v for k, v in mm_batch.items() if k not in ("pixel_values", "image_grid_thw")}
    with raises(InputError, "pixel_values", "image placeholder tokens", "is None"):
        model.thinker(**no_pixels)
    with raises(InputError, "video_second_per_grid", "one value per video (1)", "shape=[2]"):
        model.thinker(**with_(mm_batch, video_second_per_grid=torch.tensor([1.0, 1.0])))


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda b: with_(b, input_ids=b["input_ids"].float()), ["input_ids", "integer token ids", "float32"]),
        (lambda b: with_(b, input_ids=b["input_ids"][0], attention_mask=b["attention_mask"][0]),
         ["input_ids", "[batch, time]", "input_ids[None]", "shape=[10]"]),
        (lambda b: with_(b, input_ids=b["input_ids"].tolist()), ["input_ids", "LongTensor", "[["]),
        (lambda b: with_(b, input_ids=b["input_ids"][:, :0], attention_mask=b["attention_mask"][:, :0]),
         ["input_ids", "at least one", "[1, 0]"]),
        (lambda b: with_(b, attention_mask=b["attention_mask"][:, 1:]), ["attention_mask", "[1, 10]", "shape=[1, 9]"]),
        (lambda b: with_(b, input_ids=b["input_ids"] + 200_000), ["input_ids", "[0, 152064)", "351"]),
        (lambda b: with_(b, input_ids=-b["input_ids"]), ["input_ids", "[0, 152064)", "-1516"]),
        (lambda b: with_(b, position_ids=torch.zeros(2, 1, 10)), ["position_ids", "[3, 1, 10]", "shape=[2, 1, 10]"]),
        (lambda b: with_(b, labels=b["input_ids"][:, 1:]), ["labels", "[1, 10]", "shape=[1, 9]"]),
        (lambda b: with_(b, pixel_values=torch.zeros(4, 1536)), ["image_grid_thw", "required with pixel_values"]),
        (lambda b: with_(b, image_grid_thw=torch.tensor([[1, 2, 2]])), ["pixel_values", "required with image_grid"]),
    ],
)
def test_wrong_inputs_to_the_thinker(model, processor, change, fragments):
    batch = processor(user(TEXT))
    assert batch["input_ids"].shape == (1, 10)
    bad = change(batch)
    cache = model.thinker.model.new_cache(1, 64)
    with raises(InputError, *fragments):
        model.thinker(**bad, cache=cache)
    assert cache.length == 0, "a failed forward wrote into the cache"
    out = model.thinker(**batch, cache=cache)  # the cache is as good as new
    assert torch.equal(out.logits, model.thinker(**batch).logits)


def test_inputs_embeds_of_the_wrong_width(model):
    with raises(InputError, "inputs_embeds", "[batch, time, 64]", "shape=[1, 3, 7]"):
        model.thinker(inputs_embeds=torch.zeros(1, 3, 7))


def test_prompt_longer_than_max_position_embeddings(model, processor):
    limit = model.config.thinker.text.max_position_embeddings
    with raises(InputError, "input_ids", f"{limit + 1} tokens", f"max_position_embeddings={limit}"):
        model.thinker(input_ids=torch.zeros(1, limit + 1, dtype=torch.long))
    cache = model.thinker.model.new_cache(1, 4)
    model.thinker(input_ids=torch.zeros(1, 2, dtype=torch.long), cache=cache)
    cache.length = limit - 1  # as if the cache held limit - 1 tokens: one more fits, two do not
    with raises(InputError, "2 tokens after", f"max_position_embeddings={limit}"):
        model.thinker(input_ids=torch.zeros(1, 2, dtype=torch.long), position_ids=torch.zeros(3, 1, 2), cache=cache)
    batch = processor(user(TEXT))
    with raises(InputError, "input_ids", "prompt of 10 tokens", f"max_new_tokens={limit}", f"={limit}"):
        model.generate(**batch, max_new_tokens=limit, return_audio=False)


# ---- generate and stream ------------------------------------------------------------------------------------------
KNOB_CASES = [
    ({"do_sample": True, "temperature": 0.0}, ["temperature:", "> 0 when sampling", "0.0"]),
    ({"do_sample": True, "temperature": -1}, ["temperature:", "-1"]),
    ({"temperature": "hot"}, ["temperature:", "finite number", "'hot'"]),
    ({"top_p": 0.0}, ["top_p:", "(0, 1]", "0.0"]),
    ({"top_p": 1.5}, ["top_p:", "(0, 1]", "1.5"]),
    ({"top_k": -1}, ["top_k:", ">= 0", "-1"]),
    ({"top_k": 2.5}, ["top_k:", "int", "2.5"]),
    ({"min_p": 1.0}, ["min_p:", "[0, 1)", "1.0"]),
    ({"repetition_penalty": 0}, ["repetition_penalty:", "> 0", "0"]),
]


PREDICTOR_KNOBS = {"do_sample", "temperature", "top_k", "top_p"}  # the code predictor has no min_p / penalty


@pytest.mark.parametrize(
    "stage,knobs,fragments",
    [(stage, knobs, fragments) for stage in ("", "talker_", "predictor_") for knobs, fragments in KNOB_CASES
     if stage != "predictor_" or set(knobs) <= PREDICTOR_KNOBS],
)
def test_sampling_knobs(model, processor, stage, knobs, fragments):
    batch = processor(user(TEXT))
    kw = {stage + k: v for k, v in knobs.items()}
    with raises(InputError, *[stage + fragments[0], *fragments[1:]]):
        model.generate(**batch, max_new_tokens=2, talker_max_new_tokens=2, **kw)


@pytest.mark.parametrize(
    "kw,fragments",
    [
        ({"speaker": "bob"}, ["speaker", "'bob'", "['aiden', 'chelsie', 'ethan']"]),
        ({"max_new_tokens": 0}, ["max_new_tokens", ">= 1", "0"]),
        ({"max_new_tokens": "5"}, ["max_new_tokens", "integer", "'5'"]),
        ({"talker_max_new_tokens": 0}, ["talker_max_new_tokens", ">= 1", "0"]),
        ({"eos_token_id": "x"}, ["eos_token_id", "int", "'x'"]),
        ({"pixel_value": 1}, ["unknown argument", "pixel_value"]),
    ],
)
def test_generate_arguments(model, processor, kw, fragments):
    with raises(InputError, *fragments):
        model.generate(**processor(user(TEXT)), **{"max_new_tokens": 2, **kw})


def test_return_audio_on_a_thinker_only_model(folder, processor):
    thinker_only = Qwen3Omni.from_pretrained(folder, components={"thinker"})
    with raises(InputError, "return_audio=True", "no talker/code2wav", "return_audio=False"):
        thinker_only.generate(**processor(user(TEXT)), max_new_tokens=2, return_audio=True)


def test_speech_needs_an_assistant_turn(model):
    with raises(InputError, "input_ids", "no '<|im_start|>assistant' turn"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_stream_arguments(model, processor):
    batch = processor([user(TEXT), user(TEXT)])
    with raises(InputError, "input_ids", "batch size 1", "shape=[2, 10]"):
        next(model.stream(**batch))
    with raises(InputError, "talker_top_p:", "1.5"):
        next(model.stream(**processor(user(TEXT)), talker_top_p=1.5))
    with raises(InputError, "audio_chunk_frames", "0"):
        next(model.stream(**processor(user(TEXT)), audio_chunk_frames=0))


def test_a_failed_or_interrupted_generate_leaves_nothing_behind(model, processor, monkeypatch):
    batch = processor(user(TEXT))
    kw = dict(max_new_tokens=3, talker_do_sample=False, talker_max_new_tokens=3)
    good = model.generate(**batch, **kw)
    assert good.codes[0].shape[1] >= 1, "the fixture must speak for the interruption below to happen"
    for bad in ({"top_p": 2.0}, {"speaker": "nobody"}, {"talker_top_k": -3}):
        with pytest.raises(InputError):
            model.generate(**batch, **kw, **bad)
    # An interruption in the middle: the thinker has run, the talker fails on its second step.
    original, calls = model.talker.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(model.talker, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        model.generate(**batch, **kw)
    monkeypatch.undo()
    # A stream abandoned half way.
    events = model.stream(**batch, **kw)
    next(events), next(events)
    events.close()
    again = model.generate(**batch, **kw)
    assert torch.equal(again.sequences, good.sequences)
    assert torch.equal(again.codes[0], good.codes[0]) and torch.equal(again.audio[0], good.audio[0])


# ---- Code2Wav -----------------------------------------------------------------------------------------------------
def codes(frames, fill=None, quantizers=16, seed=0):
    if fill is not None:
        return torch.full((1, quantizers, frames), fill, dtype=torch.long)
    return torch.randint(0, 2048, (1, quantizers, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """Code2Wav on a few frames is many tiny ops: one thread is faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_WHOLE = {}


def whole_wave(model) -> torch.Tensor:
    if "wave" not in _WHOLE:
        _WHOLE["wave"] = model.code2wav(torch.cat([codes(2, seed=1), codes(2, seed=2)], dim=-1))[:, 0]
    return _WHOLE["wave"]


@pytest.mark.parametrize(
    "bad,fragments",
    [
        (codes(3, fill=2048), ["codes", "[0, 2048)", "2048"]),
        (codes(3, fill=-1), ["codes", "[0, 2048)", "-1"]),
        (codes(3, quantizers=8), ["codes", "16 quantizers", "[1, 8, 3]"]),
        (codes(3).float(), ["codes", "integer tensor", "float32"]),
        (codes(3)[0], ["codes", "[batch, 16, frames]", "[16, 3]"]),
    ],
)
def test_bad_codes_for_code2wav(model, one_thread, bad, fragments):
    with raises(InputError, *fragments):
        model.code2wav(bad)
    with raises(InputError, *fragments):
        model.code2wav.chunked_decode(bad)
    dec = model.code2wav.streaming_decoder()
    first = dec.push(codes(2, seed=1))
    with raises(InputError, *fragments):
        dec.push(bad)
    # The failed push changed nothing: the stream continues exactly.
    rest = torch.cat([dec.push(codes(2, seed=2)), dec.flush()], dim=-1)
    assert torch.allclose(torch.cat([first, rest], dim=-1), whole_wave(model), atol=1e-4)


def test_streaming_batch_size_is_fixed_per_stream(model, one_thread):
    dec = model.code2wav.streaming_decoder()
    dec.push(codes(1))
    with raises(InputError, "codes", "batch size 1", "[2, 16, 1]"):
        dec.push(torch.cat([codes(1), codes(1)]))


# ---- saving -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [KeyboardInterrupt("simulated Ctrl-C"), OSError(28, "No space left on device")])
def test_interrupted_save_pretrained_leaves_the_old_checkpoint(small, tmp_path, monkeypatch, failure):
    target = copy_of(small, tmp_path)
    (target / "tokenizer.json").write_text("{}")  # a file a released folder has too
    before = snapshot(target)
    import safetensors.torch as st

    original, calls = st.save_file, {"n": 0}

    def failing(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: the first is already on disk
            raise failure
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", failing)
    model = Qwen3Omni.from_pretrained(small)
    with pytest.raises(type(failure)):
        model.save_pretrained(target, max_shard_size="4MB")
    assert calls["n"] == 2
    assert snapshot(target) == before, "the old checkpoint or its folder changed, or temporary files were left"
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "case" / "fresh", max_shard_size="4MB")  # and a save afterwards works
    assert Qwen3Omni.from_pretrained(tmp_path / "case" / "fresh").config == model.config


def test_save_pretrained_onto_a_file(small, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    before = snapshot(target)
    with raises(InputError, "out_dir", "not a folder"):
        Qwen3Omni.from_pretrained(small).save_pretrained(target)
    assert snapshot(target) == before


def test_save_pretrained_over_a_checkpoint_keeps_its_other_files(small, tmp_path):
    target = copy_of(small, tmp_path)
    (target / "tokenizer.json").write_text("{}")
    Qwen3Omni.from_pretrained(small).save_pretrained(target)
    assert (target / "tokenizer.json").is_file()


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_reports_library_errors_in_one_line(tmp_path, capsys):
    assert cli_main(["chat", "--model", str(tmp_path / "absent"), "--text", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "qwen3omni chat: error:" in err and "absent" in err and "Traceback" not in err
