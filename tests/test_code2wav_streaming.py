"""The incremental Code2Wav decoder: what it emits, concatenated, is `forward` on the whole stream.

Exactness is checked against both our offline forward and the transformers reference, on streams longer than
the attention window (so keys are evicted) and with pieces of every size, including empty ones. The cost per
frame not growing with the stream is checked structurally: the carried state has one fixed size and fixed
addresses from the first push on (no timing assertions), which is also what CUDA graph replays need.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_code2wav import WAVE_TOL, ours_like, random_codes, reference_code2wav

from qwen3omni.errors import InputError
from qwen3omni.modules import few_rows
from qwen3omni.modules.causal_conv import CausalConv1d, CausalConvTranspose1d

FRAMES = 130  # > the 72-frame window


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Pushes of one frame are hundreds of tiny ops: on a shared 2-core machine two OpenMP threads per op
    slow them down 20x (each op waits for a descheduled thread); one thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    ref = reference_code2wav(seed=5)
    ours = ours_like(ref)
    codes = random_codes(2, FRAMES, seed=11)
    with torch.no_grad():
        want = ref(codes)[:, 0]
        offline = ours(codes)[:, 0]
    return ours, codes, want, offline


def stream(model, codes, pieces):
    """Push `codes` in pieces of the given sizes (cycled), then flush: (all samples emitted, frames, emitted)."""
    dec = model.streaming_decoder()
    out, start, i = [], 0, 0
    while start < codes.shape[-1]:
        size = pieces[i % len(pieces)]
        out.append(dec.push(codes[..., start : start + size]))
        start, i = start + size, i + 1
    frames, emitted = dec.frames, dec.emitted
    out.append(dec.flush())
    return torch.cat(out, dim=-1), frames, emitted


@pytest.fixture(scope="module")
def frame_by_frame(setup):
    """The stream pushed one frame at a time: the outputs, and the carried state's size and addresses after
    each push."""
    ours, codes, _, _ = setup
    dec = ours.streaming_decoder()
    out, sizes, addresses = [], [], []
    for t in range(FRAMES):
        out.append(dec.push(codes[..., t : t + 1]))
        sizes.append(dec.state_numel())
        addresses.append([s.data_ptr() for s in dec.state_tensors()])
    return dec, out, sizes, addresses, (dec.frames, dec.emitted)


@pytest.mark.parametrize("pieces", [[1], [5], [17], [3, 0, 1, 40, 2, 71, 13]], ids=["1", "5", "17", "mixed"])
def test_stream_reproduces_forward(setup, frame_by_frame, pieces):
    ours, codes, want, offline = setup
    if pieces == [1]:
        _, out, _, _, (frames, emitted) = frame_by_frame
        wav = torch.cat(out, dim=-1)
    else:
        wav, frames, emitted = stream(ours, codes, pieces)
    assert wav.shape == want.shape == (2, ours.num_samples(FRAMES))
    assert frames == FRAMES and emitted == wav.shape[-1]
    assert float((wav - want).abs().max()) < WAVE_TOL
    assert float((wav - offline).abs().max()) < WAVE_TOL


def test_stream_with_small_window_matches_reference():
    """Window 8: keys are evicted at almost every push, and the mask inside multi-frame pushes matters."""
    over = {"code2wav_config.sliding_window": 8}
    ref = reference_code2wav(over, seed=9)
    ours = ours_like(ref, over)
    codes = random_codes(2, 40, seed=9)
    with torch.no_grad():
        want = ref(codes)[:, 0]
    for pieces in ([1], [5], [17], [2, 9, 0, 11]):
        wav, _, _ = stream(ours, codes, pieces)
        assert wav.shape == want.shape
        assert float((wav - want).abs().max()) < WAVE_TOL, pieces


def test_samples_are_released_as_soon_as_final(setup, frame_by_frame):
    """After t frames exactly num_samples(t) samples are out; the 555 held back need the next frame."""
    ours, _, _, offline = setup
    _, out, _, _, _ = frame_by_frame
    emitted = 0
    for t, piece in enumerate(out, start=1):
        assert piece.shape == (2, ours.num_samples(t) - emitted)
        emitted += piece.shape[-1]
        # held back: 8*60 + 5*12 + 4*3 + 3 = 555, one input of each x8/x5/x4/x3 transposed conv
        assert emitted == 1920 * t - 555
    assert ours.streaming_decoder().flush().shape == (0, 0)


def test_flush_releases_nothing_forward_would_keep(setup):
    """The held-back samples are never final: forward drops them too (the transposed convs' right trim)."""
    ours, codes, _, offline = setup
    dec = ours.streaming_decoder()
    head = dec.push(codes[..., :9])
    assert dec.held_back == 555
    tail = dec.flush()
    assert tail.shape == (2, 0)
    with torch.no_grad():
        assert float((head - ours(codes[..., :9])[:, 0]).abs().max()) < WAVE_TOL


def test_state_is_fixed_from_the_first_push(setup, frame_by_frame):
    """The carried state (window keys/values, conv histories, transposed-conv inputs) has one size and stays
    at the same addresses (updated in place), whatever the stream's length and the pushes' sizes."""
    ours, codes, _, _ = setup
    dec, _, sizes, addresses, _ = frame_by_frame
    window = ours.config.sliding_window
    layers = ours.config.num_hidden_layers
    kv = 2 * layers * 2 * ours.config.num_key_value_heads * (window - 1) * ours.config.head_dim
    assert len(set(sizes)) == 1 and sizes[0] > kv  # the window's keys/values plus the conv histories
    assert all(a == addresses[0] for a in addresses), "a push moved the state"
    assert dec.steady and int(dec.cache.position) == FRAMES
    # a long push does not leave a larger state behind, nor move it
    dec.push(codes[..., :50])
    assert dec.state_numel() == sizes[-1]
    assert [s.data_ptr() for s in dec.state_tensors()] == addresses[0]


def test_flush_resets_for_a_new_stream(setup):
    ours, codes, _, offline = setup
    dec = ours.streaming_decoder()
    assert not dec.steady
    dec.push(codes[..., :7])
    assert dec.steady
    dec.flush()
    assert dec.frames == 0 and not dec.steady and int(dec.cache.position) == 0
    assert all(not s.any() for s in dec.state_tensors())  # zeroed in place, kept for the next stream
    again = torch.cat([dec.push(codes[..., :20]), dec.flush()], -1)
    with torch.no_grad():
        assert float((again - ours(codes[..., :20])[:, 0]).abs().max()) < WAVE_TOL
    assert dec.flush().shape == (0, 0)  # nothing pushed since: no batch known
    # a new stream of another batch size gets buffers of its size
    one = torch.cat([dec.push(codes[:1, :, :20]), dec.flush()], -1)
    assert float((one - again[:1]).abs().max()) < WAVE_TOL


def test_push_validates_codes(setup):
    ours, codes, _, _ = setup
    dec = ours.streaming_decoder()
    dec.push(codes[..., :3])
    with pytest.raises(InputError, match="batch size 2"):
        dec.push(codes[:1, :, 3:5])
    with pytest.raises(InputError, match="2048"):
        dec.push(torch.full((2, 16, 1), 2048))
    with pytest.raises(InputError, match="integer"):
        dec.push(codes[..., 3:5].float())
    with pytest.raises(InputError, match="16 quantizers"):
        dec.push(codes[:, :8, 3:5])
    assert dec.push(codes[..., 3:3]).shape == (2, 0)


# ---- the generic causal conv pieces -------------------------------------------------------------------------
def _steps(module, x, pieces):
    state, out, start, i = {}, [], 0, 0
    while start < x.shape[-1]:
        out.append(module.step(x[..., start : start + pieces[i % len(pieces)]], state))
        start, i = start + pieces[i % len(pieces)], i + 1
    return torch.cat(out, -1)


@pytest.mark.parametrize("kernel,stride", [(2, 2), (16, 8), (9, 3), (6, 2), (3, 1)])
def test_transposed_conv_streams_and_matches_trimmed_conv_transpose(kernel, stride):
    torch.manual_seed(kernel * 10 + stride)
    m = CausalConvTranspose1d(6, 5, kernel, stride).eval()
    x = torch.randn(2, 6, 23)
    trim = kernel - stride
    with torch.no_grad():
        full = F.conv_transpose1d(x, m.conv.weight, m.conv.bias, stride=stride)
        want = full[..., trim : full.shape[-1] - trim]
        assert torch.allclose(m(x), want, atol=1e-5)
        for pieces in ([1], [4], [2, 0, 7]):
            assert torch.allclose(_steps(m, x, pieces), want, atol=1e-5), pieces


@pytest.mark.parametrize("kernel,dilation,groups", [(7, 1, 1), (7, 9, 1), (7, 1, 4), (1, 1, 1)])
def test_causal_conv_streams(kernel, dilation, groups):
    torch.manual_seed(kernel + dilation + groups)
    m = CausalConv1d(4, 8, kernel, dilation=dilation, groups=groups).eval()
    x = torch.randn(2, 4, 70)
    with torch.no_grad():
        want = m.conv(F.pad(x, ((kernel - 1) * dilation, 0)))
        assert torch.allclose(m(x), want, atol=1e-5)
        for pieces in ([1], [5], [3, 0, 60]):
            assert torch.allclose(_steps(m, x, pieces), want, atol=1e-5), pieces


@pytest.mark.parametrize("length", [9, 10, 11, 12])
def test_strided_causal_conv_pads_right_to_a_whole_stride(length):
    """Offline only (Code2Wav's convs all have stride 1): the input is right-padded to a multiple of the stride."""
    torch.manual_seed(length)
    m = CausalConv1d(3, 2, 4, stride=3).eval()
    x = torch.randn(1, 3, length)
    extra = -(-length // 3) * 3 - length
    with torch.no_grad():
        assert torch.allclose(m(x), m.conv(F.pad(x, (1, extra))), atol=1e-6)


@pytest.mark.skipif(few_rows._ONEDNN_LINEAR is None, reason="no oneDNN linear in this torch build")
def test_frame_pushes_take_the_few_row_kernel(setup, monkeypatch):
    """One-frame pushes of a 2-row batch multiply 4-8 row blocks: they must run (and stay exact) through the
    oneDNN kernel of `few_row_linear`, or the fixture would not exercise it."""
    ours, codes, _, offline = setup
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    real = few_rows._ONEDNN_LINEAR
    monkeypatch.setattr(few_rows, "_ONEDNN_LINEAR", counting)
    wav, _, _ = stream(ours, codes[..., :20], [1])
    assert calls
    assert float((wav - offline[:, : wav.shape[-1]]).abs().max()) < WAVE_TOL


# ---- pushes replayed from CUDA graphs (the bookkeeping, run eagerly on CPU) -------------------------------------
def test_graphed_decoder_replays_steady_pushes_exactly(setup, monkeypatch):
    """`GraphedStreamingDecoder` (what `stream` uses on CUDA) builds a replay for a push size on its second
    use, after a warm-up run whose effect it must undo, and keeps it across streams. On CPU the replay runs
    the decode eagerly over the same fixed buffers, so any state the undo misses shows in the samples."""
    from qwen3omni.generation import graphs

    ours, codes, want, _ = setup
    built = []
    real_replay = graphs._PushReplay

    def counting(*args, **kwargs):
        built.append(args[1].shape[-1])
        return real_replay(*args, **kwargs)

    monkeypatch.setattr(graphs, "_PushReplay", counting)
    dec = graphs.GraphedStreamingDecoder(ours)
    pieces = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 3]  # 130 frames, as `stream` pushes them
    for round_ in range(2):
        out, start = [], 0
        for size in pieces:
            out.append(dec.push(codes[..., start : start + size]))
            start += size
        assert dec.frames == FRAMES
        out.append(dec.flush())
        wav = torch.cat(out, dim=-1)
        assert float((wav - want).abs().max()) < WAVE_TOL, round_
    # sizes 2, 4 and 3 come once per stream: built in the second stream; 8 in the first
    assert sorted(built) == [2, 3, 4, 8]
    assert set(dec.replays) == {(2, 2), (2, 3), (2, 4), (2, 8)}
    # a weight changed in place between streams drops the replays (a captured graph would read stale copies)
    with torch.no_grad():
        ours.decoder[1].block[1].conv.weight.mul_(1.0)
    dec.push(codes[..., :1])
    assert not dec.replays
    dec.flush()


def test_stream_lease_shares_the_graphed_decoder_one_stream_at_a_time(setup):
    from qwen3omni.generation import graphs

    ours, _, _, _ = setup
    with graphs.streaming_decoder(ours, True) as first:
        with graphs.streaming_decoder(ours, True) as second:
            assert isinstance(first, graphs.GraphedStreamingDecoder)
            assert not isinstance(second, graphs.GraphedStreamingDecoder)  # held by the first stream
    with graphs.streaming_decoder(ours, True) as again:
        assert again is first
    with graphs.streaming_decoder(ours, False) as plain:
        assert not isinstance(plain, graphs.GraphedStreamingDecoder)


def test_a_new_stream_follows_the_model_to_another_dtype(setup):
    """Buffers kept from an earlier stream are replaced when the model's dtype (or device) has changed."""
    ours, codes, _, offline = setup
    dec = ours.streaming_decoder()
    dec.push(codes[..., :3])
    dec.flush()
    try:
        ours.double()
        wav = dec.push(codes[..., :6])
        assert wav.dtype == torch.float64 and dec.state_tensors()[0].dtype == torch.float64
    finally:
        ours.float()
    dec.flush()
    assert float((dec.push(codes[..., :6]) - offline[:, : ours.num_samples(6)]).abs().max()) < WAVE_TOL
