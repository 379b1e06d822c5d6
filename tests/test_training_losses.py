"""Training losses (issue 8): the thinker's LM + MoE auxiliary loss against transformers, the talker's
teacher-forced loss against greedy generation, and overfitting one example.

Calibration (tiny config, sensitive init, fp32 CPU): ours vs the reference's LM and auxiliary losses differ by
0.0 (text with left- and right-padded rows; audio + image); dropping the padding mask from the load-balancing
loss moves the auxiliary loss by 1.8e-2, masking one more label moves the LM loss by 7e-3: the 1e-4
tolerance sits between.
"""

from __future__ import annotations

import copy

import pytest
import torch
from processor_fixtures import PHOTO, make_checkpoint_folder, speech

from qwen3omni.errors import InputError
from qwen3omni.generation.speech import suppressed_ids
from qwen3omni.processing import Processor
from qwen3omni.training import (
    IGNORE_INDEX,
    load_balancing_loss,
    synthetic_example,
    talker_loss,
    train_only,
    with_answer,
)

LOSS_TOL = 1e-4
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}


def user(*items):
    return [SYSTEM, {"role": "user", "content": list(items)}]


def text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(make_checkpoint_folder(tmp_path_factory.mktemp("training_proc"), role_tokens=True))


def random_answers(config, lengths, seed=0):
    """Answers of the given lengths (each ending with <|im_end|>), right-padded with further tokens."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    answer = torch.randint(300, 1000, (len(lengths), n), generator=g)
    for b, k in enumerate(lengths):
        answer[b, k - 1] = config.im_end_token_id
    return answer


def reference_losses(ref, batch):
    keys = ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask", "pixel_values",
            "image_grid_thw")
    with torch.no_grad():
        out = ref.thinker(**{k: batch[k] for k in keys if k in batch}, output_router_logits=True)
    return out.loss, out.aux_loss


# ---- thinker ------------------------------------------------------------------------------------------------
def test_thinker_loss_matches_reference_text(tiny_checkpoint, tiny_model, processor):
    model = tiny_model
    prompt = processor([user(text("Tell me a story about a cat.")), user(text("Hi!"))])
    assert prompt["attention_mask"][1].min() == 0, "the fixture must have a left-padded row"
    batch = with_answer(prompt, random_answers(model.config, [5, 3]), model.config)
    assert (batch["labels"] != IGNORE_INDEX).sum() == 8 and batch["attention_mask"][1, -1] == 0
    with torch.no_grad():
        ours = model.thinker(**batch, output_router_logits=True)
    ref_loss, ref_aux = reference_losses(tiny_checkpoint.reference, batch)
    assert abs(float(ours.loss) - float(ref_loss)) < LOSS_TOL
    assert abs(float(ours.aux_loss) - float(ref_aux)) < LOSS_TOL
    # calibration: padding left in the balance loss, one label fewer: both far outside the tolerance
    cfg = model.config.thinker.text
    unmasked = load_balancing_loss(ours.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
    assert abs(float(unmasked) - float(ref_aux)) > 10 * LOSS_TOL
    fewer = dict(batch, labels=batch["labels"].clone())
    fewer["labels"][0, -5] = IGNORE_INDEX
    with torch.no_grad():
        assert abs(float(model.thinker(**fewer).loss) - float(ref_loss)) > 10 * LOSS_TOL
    # without output_router_logits the loss is the LM loss alone, as in the reference
    with torch.no_grad():
        plain = model.thinker(**batch)
    assert plain.aux_loss is None
    expected = ref_loss - cfg.router_aux_loss_coef * ref_aux
    assert abs(float(plain.loss) - float(expected)) < LOSS_TOL


def test_thinker_loss_matches_reference_multimodal(tiny_checkpoint, tiny_model, processor):
    conv = user({"type": "audio", "audio": speech()[:32000]}, {"type": "image", "image": str(PHOTO)},
                text("What do you hear and see?"))
    prompt = processor(conv)
    assert {"input_features", "pixel_values"} <= set(prompt)
    batch = with_answer(prompt, random_answers(tiny_model.config, [6]), tiny_model.config)
    with torch.no_grad():
        ours = tiny_model.thinker(**batch, output_router_logits=True)
    ref_loss, ref_aux = reference_losses(tiny_checkpoint.reference, batch)
    assert abs(float(ours.loss) - float(ref_loss)) < LOSS_TOL
    assert abs(float(ours.aux_loss) - float(ref_aux)) < LOSS_TOL


# ---- talker -------------------------------------------------------------------------------------------------
def _stop_early(model, codes_rows, max_frames):
    """Make the talker emit codec EOS wherever it would have chosen a code that only the last row uses, from
    frame 3 on, so the rows stop speaking at different frames."""
    row0, last = codes_rows[0][0].tolist(), codes_rows[-1][0].tolist()
    stop = next(c for i, c in enumerate(last) if i >= 3 and c not in last[:i] and c not in row0)
    eos = model.config.talker.codec_eos_token_id
    with torch.no_grad():
        model.talker.codec_head.weight[eos] = 2.0 * model.talker.codec_head.weight[stop]


def test_teacher_forcing_reproduces_greedy_generation(tiny_model, processor):
    """Codes from greedy `generate` are the teacher-forced argmax of codec_head (layer 0, EOS included) and of
    all 15 code predictor heads: training and inference read the same inputs."""
    model = copy.deepcopy(tiny_model)
    batch = processor([
        user({"type": "audio", "audio": speech()[:24000]}, text("What is said?")),
        user(text("Tell me a story.")),
    ])
    knobs = dict(talker_do_sample=False, talker_repetition_penalty=1.0, talker_max_new_tokens=14)
    P = batch["input_ids"].shape[1]
    probe = model.generate(**batch, max_new_tokens=6, return_audio=False).sequences[:, P:]
    stop_token = int(probe[1, 2])  # row 1's answer ends after 3 tokens, row 0's (most likely) runs on
    first = model.generate(**batch, max_new_tokens=6, eos_token_id=stop_token, **knobs)
    _stop_early(model, first.codes, 14)
    res = model.generate(**batch, max_new_tokens=6, eos_token_id=stop_token, **knobs)
    answer = res.sequences[:, P:]
    lengths = [c.shape[1] for c in res.codes]
    stopped = [n < knobs["talker_max_new_tokens"] - 1 for n in lengths]
    assert any(stopped) and lengths[0] != lengths[1], lengths
    codes = torch.full((2, 16, max(lengths)), -100)
    for b, c in enumerate(res.codes):
        codes[b, :, : c.shape[1]] = c
    with torch.no_grad():
        out = talker_loss(model, batch, answer, codes, eos_token_id=stop_token)
    layer0 = out.layer0_logits.index_fill(-1, suppressed_ids(model.config, "cpu"), float("-inf")).argmax(-1)
    residual = out.residual_logits.argmax(-1)  # [B, T, 15]
    for b, c in enumerate(res.codes):
        n = c.shape[1]
        assert torch.equal(layer0[b, :n], c[0]), b
        assert torch.equal(residual[b, :n].T, c[1:]), b
        if stopped[b]:
            assert layer0[b, n] == model.config.talker.codec_eos_token_id, b
    # targets: codes, then EOS right after each row's last frame, ignored beyond
    for b, n in enumerate(lengths):
        assert torch.equal(out.layer0_targets[b, :n], codes[b, 0, :n])
        assert out.layer0_targets[b, n] == model.config.talker.codec_eos_token_id
        assert (out.layer0_targets[b, n + 1 :] == IGNORE_INDEX).all()
        assert (out.residual_targets[b, n:] == IGNORE_INDEX).all()


def test_talker_loss_parts_and_options(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    batch, answer, codes = synthetic_example(model.config, batch=2, frames=5, seed=1)
    out = talker_loss(model, batch, answer, codes)
    assert out.layer0_logits.shape[:2] == (2, 6) and out.residual_logits.shape[:3] == (2, 5, 15)
    torch.testing.assert_close(out.loss, out.layer0_loss + out.residual_loss)
    weighted = talker_loss(model, batch, answer, codes, residual_weight=0.3, output_router_logits=True)
    coef = model.config.talker.text.router_aux_loss_coef
    torch.testing.assert_close(weighted.loss, out.layer0_loss + 0.3 * out.residual_loss + coef * weighted.aux_loss)
    no_eos = talker_loss(model, batch, answer, codes, include_eos=False)
    assert no_eos.layer0_targets.shape == (2, 5) and torch.equal(no_eos.layer0_targets, codes[:, 0])
    # the EOS-free variant predicts the same frames from the same inputs
    torch.testing.assert_close(no_eos.layer0_logits, out.layer0_logits[:, :5], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_eos.residual_loss, out.residual_loss, rtol=1e-5, atol=1e-6)
    # one backward reaches the talker, the code predictor (every head) and the projections
    out.loss.backward()
    for name in ("talker.codec_head.weight", "talker.text_projection.linear_fc1.weight",
                 "talker.model.layers.0.mlp.experts.gate_up_proj", "talker.code_predictor.lm_head.14.weight",
                 "talker.code_predictor.model.codec_embedding.14.weight", "talker.model.codec_embedding.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_talker_loss_reads_media_through_the_thinker(tiny_model, processor):
    model = copy.deepcopy(tiny_model).train()
    train_only(model, "talker.hidden_projection", "thinker.audio_tower")
    batch = processor(user({"type": "audio", "audio": speech()[:16000]}, text("Repeat.")))
    answer = random_answers(model.config, [4])
    codes = torch.randint(0, 2048, (1, 16, 3))
    talker_loss(model, batch, answer, codes).loss.backward()
    for name in ("talker.hidden_projection.linear_fc1.weight", "thinker.audio_tower.proj2.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_talker_loss_rejects_bad_input(tiny_model):
    batch, answer, codes = synthetic_example(tiny_model.config, batch=2, frames=4)
    with pytest.raises(InputError, match="codes"):
        talker_loss(tiny_model, batch, answer, codes[:, :8])
    gap = codes.clone()
    gap[0, 0, 1] = -100  # a padding frame followed by a real one
    with pytest.raises(InputError, match="valid frames"):
        talker_loss(tiny_model, batch, answer, gap)
    with pytest.raises(InputError, match="assistant_ids"):
        talker_loss(tiny_model, batch, answer[:1], codes)
    with pytest.raises(InputError, match="generation prompt"):
        talker_loss(tiny_model, with_answer(batch, answer, tiny_model.config), answer, codes)
    with pytest.raises(InputError, match="speaker"):
        talker_loss(tiny_model, batch, answer, codes, speaker="nobody")
    # codes past a vocabulary would fail inside an embedding or the loss (a device-side assert on a GPU)
    talker_vocab = tiny_model.config.talker.text.vocab_size
    residual_vocab = tiny_model.config.talker.code_predictor.vocab_size
    for layer, value, vocab in ((0, talker_vocab, talker_vocab), (3, residual_vocab, residual_vocab),
                                (3, -7, residual_vocab)):
        bad = codes.clone()
        bad[1, layer, 0] = value
        with pytest.raises(InputError, match=rf"codes: layer.* must be in \[0, {vocab}\), got {value}"):
            talker_loss(tiny_model, batch, answer, bad)
    with pytest.raises(InputError, match="codes: expected integer codec ids"):
        talker_loss(tiny_model, batch, answer, codes.float())
    with pytest.raises(InputError, match="assistant_ids: expected integer token ids"):
        talker_loss(tiny_model, batch, answer.tolist(), codes)


def test_thinker_labels_are_checked(tiny_model):
    batch, answer, _ = synthetic_example(tiny_model.config, batch=2, frames=4)
    train = with_answer(batch, answer, tiny_model.config)
    vocab = tiny_model.config.thinker.text.vocab_size
    labels = train.pop("labels")
    with torch.no_grad():
        assert tiny_model.thinker(**train, labels=labels).loss.isfinite()  # the valid labels pass
        past_vocab = labels.clone().index_fill_(1, torch.tensor([-1]), vocab)
        for bad, message in ((past_vocab, rf"expected token ids in \[0, {vocab}\).*got {vocab}"),
                             (labels.float(), "expected integer token ids")):
            with pytest.raises(InputError, match="labels: " + message):
                tiny_model.thinker(**train, labels=bad)
        with pytest.raises(InputError, match="logits_to_keep: must be 0 when labels are given"):
            tiny_model.thinker(**train, labels=labels, logits_to_keep=1)
    with pytest.raises(InputError, match="answer_ids: expected a tensor"):
        with_answer(batch, answer.tolist(), tiny_model.config)


# ---- acceptance: overfitting one example --------------------------------------------------------------------
def test_overfitting_one_example_drives_every_part_down(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    # the thinker's head and last layer (backpropagating through all its layers only costs time here)
    train_only(model, "thinker.model.layers.2", "thinker.lm_head", "talker.model.layers", "talker.codec_head",
               "talker.code_predictor.model.layers", "talker.code_predictor.lm_head")
    batch, answer, codes = synthetic_example(model.config, batch=1, prompt_tokens=6, answer_tokens=6, frames=6)
    thinker_batch = with_answer(batch, answer, model.config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)
    history = []
    for _ in range(30):
        thinker = model.thinker(**thinker_batch).loss
        talker = talker_loss(model, batch, answer, codes)
        optimizer.zero_grad()
        (thinker + talker.loss).backward()
        optimizer.step()
        history.append([thinker.item(), talker.layer0_loss.item(), talker.residual_loss.item()])
    first, last = history[0], history[-1]
    for part, a, b in zip(("thinker", "talker layer 0", "code predictor"), first, last):
        assert b <= 0.1 * a, (part, a, b)
