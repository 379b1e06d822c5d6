"""Code2Wav against the transformers reference: fp32, CPU, the tiny config with sensitive weights.

The reference vocoder is built alone (no thinker/talker) from configs/tiny.json, every parameter set by
`reference.sensitive_value` (LayerScale / ConvNeXt gamma ~0.5, Snake log-parameters std 0.5, convs at a gain
that keeps activations O(1), the last conv scaled so the wave stays inside [-1, 1]); ours loads its state dict
strictly, which also checks that every module name and shape matches. Waveforms must agree within 1e-4
absolute; the calibration tests show that wrong variants move them by >= 1e-2 while the reference's own
eager and SDPA paths agree to ~1e-6.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from qwen3omni.checkpoint import export_state_dict
from qwen3omni.config import Code2WavConfig, Qwen3OmniConfig
from qwen3omni.errors import InputError
from qwen3omni.model.code2wav import Code2Wav

from reference import reference_config, released_weights, sensitive_value, tiny_config

ROOT = Path(__file__).resolve().parents[1]
WAVE_TOL = 1e-4  # absolute, on a wave of std ~0.25
WRONG_MIN = 1e-2  # what a wrong variant must move the wave by (measured: 1.2e-2 .. 0.4)
REFERENCE_JITTER_MAX = 1e-5  # eager vs SDPA in the reference (measured: ~1e-6)


def reference_code2wav(overrides: dict | None = None, attn: str = "sdpa", seed: int = 0):
    """The transformers Code2Wav of the tiny config, every parameter set by `sensitive_value`."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    model = Qwen3OmniMoeCode2Wav._from_config(reference_config(tiny_config(overrides), attn).code2wav_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sensitive_value(f"code2wav.{name}", tuple(p.shape), g))
    return model.float().eval()


def ours_like(reference, overrides: dict | None = None) -> Code2Wav:
    model = Code2Wav(Code2WavConfig.from_dict(tiny_config(overrides)["code2wav_config"]))
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


def random_codes(batch: int, frames: int, seed: int = 0, codebook: int = 2048) -> torch.Tensor:
    return torch.randint(0, codebook, (batch, 16, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny vocoder runs small ops; on a shared 2-core machine one thread avoids OpenMP stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    ref = reference_code2wav()
    return ref, ours_like(ref)


@pytest.fixture(scope="module")
def calibration_codes(pair):
    """100 frames (longer than the 72-frame window) and our wave for them."""
    _, ours = pair
    codes = random_codes(1, 100, seed=7)
    with torch.no_grad():
        return codes, ours(codes)


# ---- layout --------------------------------------------------------------------------------------------------
def test_released_layout_on_meta():
    cfg = Qwen3OmniConfig.from_pretrained(ROOT / "configs" / "qwen3-omni-30b-a3b-instruct.json").code2wav
    with torch.device("meta"):
        model = Code2Wav(cfg)
    ours = {f"code2wav.{k}": list(v.shape) for k, v in export_state_dict(model).items()}
    assert ours == released_weights("code2wav.")
    assert len(ours) == 230
    assert sum(torch.Size(s).numel() for s in ours.values()) == 216_016_577
    assert model.num_samples(1) == 1920 - 555 and model.num_samples(10) == 19200 - 555


# ---- parity ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,frames", [(2, 1), (2, 7), (1, 300), (1, 333)])
def test_waveform_matches_reference(pair, batch, frames):
    ref, ours = pair
    codes = random_codes(batch, frames, seed=frames)
    with torch.no_grad():
        want, got = ref(codes), ours(codes)
    assert got.shape == want.shape == (batch, 1, ours.num_samples(frames))
    # The fixture is alive: the wave is far from clamped, and large enough that 1e-4 is a tight bound.
    assert float(want.std()) > 0.1 and float((want.abs() >= 0.999).float().mean()) < 0.01
    assert float((got - want).abs().max()) < WAVE_TOL


@pytest.mark.parametrize("frames,chunk,context", [(333, 300, 25), (61, 16, 5), (40, 13, 0)])
def test_chunked_decode_matches_reference(pair, frames, chunk, context):
    ref, ours = pair
    codes = random_codes(1, frames, seed=frames + 1)
    with torch.no_grad():
        want = ref.chunked_decode(codes, chunk_size=chunk, left_context_size=context)
        got = ours.chunked_decode(codes, chunk_size=chunk, left_context_size=context)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < WAVE_TOL


def test_small_window_matches_reference():
    """A window of 8 frames (so the window, not the sequence, bounds attention almost everywhere)."""
    over = {"code2wav_config.sliding_window": 8}
    ref = reference_code2wav(over, seed=3)
    ours = ours_like(ref, over)
    codes = random_codes(2, 30, seed=3)
    with torch.no_grad():
        assert float((ours(codes) - ref(codes)).abs().max()) < WAVE_TOL


def test_gradients_flow_and_match_inference_path(pair):
    """With autograd on, the differentiable code path (no cached weights, no in-place Snake) gives the same wave."""
    _, ours = pair
    codes = random_codes(1, 3, seed=4)
    with torch.no_grad():
        want = ours(codes)
    wav = ours(codes)
    assert float((wav.detach() - want).abs().max()) < 1e-5
    wav.square().mean().backward()
    try:
        for name in ("decoder.1.block.1.conv.weight", "decoder.4.block.0.alpha", "upsample.0.1.gamma",
                     "pre_transformer.layers.0.self_attn.q_proj.weight", "code_embedding.weight"):
            grad = ours.get_parameter(name).grad
            assert grad is not None and float(grad.abs().max()) > 0, name
    finally:
        ours.zero_grad(set_to_none=True)


# ---- calibration ---------------------------------------------------------------------------------------------
def test_reference_paths_agree_far_below_tolerance(pair, calibration_codes):
    ref, _ = pair
    eager = reference_code2wav(attn="eager")
    codes, _ = calibration_codes
    with torch.no_grad():
        jitter = float((eager(codes) - ref(codes)).abs().max())
    assert jitter < REFERENCE_JITTER_MAX < WAVE_TOL


def _window(w):
    def apply(model):
        model.pre_transformer.window = w

    return apply


def _layer_scale_off(model):
    for layer in model.pre_transformer.layers:
        layer.self_attn_layer_scale.scale.fill_(1.0)
        layer.mlp_layer_scale.scale.fill_(1.0)


def _convnext_off(model):
    for stage in model.upsample:
        stage[1].gamma.zero_()


def _snake(path: str, param: str):
    def apply(model):
        getattr(model.get_submodule(path), param).add_(0.05)

    return apply


WRONG_VARIANTS = {
    "window 8 instead of 72": _window(8),
    "window 71 instead of 72": _window(71),
    "LayerScale off": _layer_scale_off,
    "ConvNeXt branch off": _convnext_off,
    "final Snake alpha +0.05": _snake("decoder.5", "alpha"),
    "first residual unit Snake beta +0.05": _snake("decoder.1.block.2.act1", "beta"),
    "last residual unit Snake alpha +0.05": _snake("decoder.4.block.4.act2", "alpha"),
}


@pytest.mark.parametrize("variant", list(WRONG_VARIANTS))
def test_wrong_variants_move_the_wave(pair, calibration_codes, variant):
    _, ours = pair
    codes, base = calibration_codes
    wrong = copy.deepcopy(ours)
    with torch.no_grad():
        WRONG_VARIANTS[variant](wrong)
        moved = float((wrong(codes) - base).abs().max())
    assert moved >= WRONG_MIN, f"{variant}: moved the wave by only {moved:.2e}"


# ---- input validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "codes,fragment",
    [
        (torch.zeros(1, 15, 4, dtype=torch.long), "16 quantizers"),
        (torch.zeros(16, 4, dtype=torch.long), "[batch, 16, frames]"),
        (torch.full((1, 16, 4), 2048), "2048"),
        (torch.full((1, 16, 4), -1), "-1"),
        (torch.zeros(1, 16, 4), "integer tensor"),
        (torch.zeros(1, 16, 4, dtype=torch.bool), "integer tensor"),
        ([[0] * 4] * 16, "integer tensor"),
        (torch.zeros(1, 16, 0, dtype=torch.long), "at least one frame"),
    ],
)
def test_bad_codes_raise_input_error(pair, codes, fragment):
    _, ours = pair
    with pytest.raises(InputError, match="codes") as err:
        ours(codes)
    assert fragment in str(err.value)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"chunk_size": 2.5}, {"left_context_size": -1},
                                    {"chunk_size": True}])
def test_bad_chunk_arguments_raise_input_error(pair, kwargs):
    _, ours = pair
    with pytest.raises(InputError, match=next(iter(kwargs))):
        ours.chunked_decode(random_codes(1, 4), **kwargs)
