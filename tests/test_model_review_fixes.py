"""Model entry points refuse what they cannot honour, naming the argument, instead of failing inside torch or
silently dropping inputs (found in review)."""

from __future__ import annotations

import copy

import pytest
import torch

from qwen3omni.errors import InputError


def ids(model, batch=2, length=6):
    return torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))


def test_media_with_inputs_embeds_are_refused_not_dropped(tiny_model):
    thinker = tiny_model.thinker
    embeds = thinker.model.embed_tokens(ids(thinker, 1))
    pixels = torch.zeros(16, thinker.visual.patch_embed.proj.weight[0].numel())
    with pytest.raises(InputError, match="pixel_values: media need input_ids"):
        thinker(inputs_embeds=embeds, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match="input_features: media need input_ids"):
        thinker(inputs_embeds=embeds, input_features=torch.zeros(1, 128, 100))


@torch.no_grad()
def test_a_cache_that_does_not_fit_is_refused(tiny_model):
    thinker, talker = tiny_model.thinker, tiny_model.talker
    x = ids(thinker)
    for cache in (thinker.model.new_cache(1, 16),  # another batch
                  thinker.model.new_cache(2, 16, dtype=torch.bfloat16),  # another dtype
                  talker.model.new_cache(2, 16)):  # another stack
        with pytest.raises(InputError, match=r"cache: expected one from this model's new_cache\(2"):
            thinker(input_ids=x, cache=cache)
    embeds = torch.randn(2, 5, talker.config.text.hidden_size)
    with pytest.raises(InputError, match="cache: expected"):
        talker(embeds, cache=talker.model.new_cache(3, 16))
    assert thinker(input_ids=x, cache=thinker.model.new_cache(2, 16)).logits.isfinite().all()  # one that fits


@torch.no_grad()
def test_float32_inputs_to_a_bf16_model_are_cast(tiny_model):
    thinker = copy.deepcopy(tiny_model.thinker).to(torch.bfloat16)
    embeds = thinker.model.embed_tokens(ids(thinker))  # bf16
    want = thinker(inputs_embeds=embeds).logits
    assert torch.equal(thinker(inputs_embeds=embeds.float()).logits, want)  # bf16 -> fp32 -> bf16 is exact
    talker = copy.deepcopy(tiny_model.talker).to(torch.bfloat16)
    hidden = torch.randn(2, talker.config.text.hidden_size)
    code0 = torch.tensor([3, 5])
    frame = talker.predict_residual(hidden, code0)
    assert torch.equal(frame.codes, talker.predict_residual(hidden.bfloat16(), code0).codes)


def test_talker_embeds_must_be_a_float_tensor_and_logits_to_keep_an_int(tiny_model):
    talker, thinker = tiny_model.talker, tiny_model.thinker
    C = talker.config.text.hidden_size
    for bad in ([[0.0] * C], torch.zeros(1, 4, C, dtype=torch.long)):
        with pytest.raises(InputError, match="inputs_embeds: expected a float tensor"):
            talker(bad)
    with pytest.raises(InputError, match="logits_to_keep: expected an integer >= 0, got 2.0"):
        talker(torch.zeros(1, 4, C), logits_to_keep=2.0)
    with pytest.raises(InputError, match="logits_to_keep: expected an integer >= 0"):
        thinker(input_ids=ids(thinker), logits_to_keep=torch.tensor([2, 4]))


def test_video_errors_name_the_video_arguments(tiny_model):
    thinker = tiny_model.thinker
    cfg = thinker.config
    x = torch.tensor([[1, cfg.video_token_id, cfg.video_token_id, cfg.video_token_id, cfg.video_token_id, 2]])
    with pytest.raises(InputError, match=r"pixel_values_videos: expected \[patches"):
        thinker(input_ids=x, pixel_values_videos=torch.zeros(16, 100), video_grid_thw=torch.tensor([[1, 4, 4]]))
    width = thinker.visual.patch_embed.proj.weight[0].numel()
    with pytest.raises(InputError, match="video_grid_thw: heights and widths must be multiples"):
        thinker(input_ids=x, pixel_values_videos=torch.zeros(12, width), video_grid_thw=torch.tensor([[1, 4, 3]]))


def test_codec_helpers_check_their_ids(tiny_model):
    talker = tiny_model.talker
    V0, V = talker.config.text.vocab_size, talker.config.code_predictor.vocab_size
    G = talker.config.num_code_groups
    residual = torch.zeros(2, G - 1, dtype=torch.long)
    assert talker.codec_step_embedding(torch.tensor([1, 2]), residual).shape[0] == 2  # in range: fine
    with pytest.raises(InputError, match=rf"layer0_ids: expected codec ids in \[0, {V0}\), got {V0}"):
        talker.codec_step_embedding(torch.tensor([1, V0]), residual)
    with pytest.raises(InputError, match=rf"residual_codes: expected codec ids in \[0, {V}\), got {10**6}"):
        talker.codec_step_embedding(torch.tensor([1, 2]), residual.index_fill(1, torch.tensor([3]), 10**6))
    hidden = torch.randn(1, 3, talker.config.text.hidden_size)
    codes = torch.zeros(1, 3, G, dtype=torch.long)
    codes[0, 2] = -100  # a padding frame: ignored, not an error
    assert talker.code_predictor_logits(hidden, codes).isfinite().all()
    codes[0, 1, 5] = V
    with pytest.raises(InputError, match=rf"codes_BTG\[..., 1:\]: expected codec ids in \[0, {V}\)"):
        talker.code_predictor_logits(hidden, codes)


def test_placement_refuses_devices_that_hold_no_data_or_are_absent(tiny_checkpoint):
    from qwen3omni.model.omni import Qwen3Omni
    from qwen3omni.model.placement import resolve_devices

    parts = ("thinker", "talker", "code2wav")
    with pytest.raises(InputError, match="device: expected a device that holds data, got 'meta'"):
        Qwen3Omni.from_pretrained(tiny_checkpoint.path, device="meta")
    with pytest.raises(InputError, match=r"device\['talker'\]: 'meta'|device\['talker'\]: expected a device that"):
        resolve_devices({"thinker": "cpu", "talker": "meta", "code2wav": "cpu"}, parts)
    for absent in ("xpu", "mps") if not torch.backends.mps.is_available() else ("xpu",):
        with pytest.raises(InputError, match=rf"device: '{absent}' is not available"):
            resolve_devices(absent, parts)
    with pytest.raises(InputError, match="device: unknown component"):  # keys of mixed types: still an InputError
        resolve_devices({"thinker": "cpu", "talker": "cpu", "code2wav": "cpu", 0: "cpu", "vocoder": "cpu"}, parts)


def test_empty_batches_of_codes_and_non_bool_compile_flags_are_refused(tiny_model):
    empty = torch.zeros(0, tiny_model.config.code2wav.num_quantizers, 3, dtype=torch.long)
    with pytest.raises(InputError, match=r"codes: expected at least one row, got shape \[0, "):
        tiny_model.code2wav(empty)
    with pytest.raises(InputError, match=r"codes: expected at least one row, got shape \[0, "):
        tiny_model.code2wav.streaming_decoder().push(empty)
    with pytest.raises(InputError, match="enable: expected True or False, got 'false'"):
        tiny_model.compile_decoding("false")
    assert all(s.compiled_step is None for s in (tiny_model.thinker.model, tiny_model.talker.model))


def test_a_stack_pickles_with_compilation_on_or_after_it(tiny_model):
    """torch.save of a whole stack works whether its decode step is compiled or was (the compiled wrapper and
    the stack's own copy of run_layer are left out; the loaded stack runs eagerly until compiled again)."""
    import io

    stack = copy.deepcopy(tiny_model.thinker.model)
    for toggles in ((True,), (True, False)):
        for on in toggles:
            stack.compile_decode_step(on)
        buf = io.BytesIO()
        torch.save(stack, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert loaded.compiled_step is None and loaded._layer_step is None
    stack.compile_decode_step(False)
