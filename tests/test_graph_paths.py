"""The decode paths that run as CUDA graphs on a GPU (static KV cache, fixed buffers, the code predictor's
per-step runner) give the same tokens, codes and waveforms as the plain eager loops. On a CPU they run eagerly
over the same buffers, so their logic is checked here; the GPU check script times them captured."""

from __future__ import annotations

import pytest
import torch

from qwen3omni.generation import graphs, speech, text
from qwen3omni.generation.sampling import SamplingConfig


def prompt(model, rows: int = 1):
    ids = [151644, 872, 198, 100, 200, 300, 151645, 198, 151644, 77091, 198]
    short = [151644, 872, 198, 400, 151645, 198, 151644, 77091, 198]
    if rows == 1:
        return {"input_ids": torch.tensor([ids])}
    padded = [151643] * (len(ids) - len(short)) + short
    mask = [[1] * len(ids), [0, 0] + [1] * len(short)]
    return {"input_ids": torch.tensor([ids, padded]), "attention_mask": torch.tensor(mask)}


@pytest.mark.parametrize("rows", [1, 2])
def test_graph_paths_equal_the_eager_loops(tiny_model, rows, monkeypatch):
    batch = prompt(tiny_model, rows)
    kw = dict(max_new_tokens=8, talker_do_sample=False, talker_max_new_tokens=12)
    eager = tiny_model.generate(**batch, **kw)
    # Take the graph code paths on CPU: they run eagerly there, over the same static buffers.
    monkeypatch.setattr(text, "graphs_wanted", lambda device, requested: True)
    monkeypatch.setattr(speech, "graphs_wanted", lambda device, requested: True)
    static = tiny_model.generate(**batch, **kw)
    assert torch.equal(static.sequences, eager.sequences)
    for a, b, wa, wb in zip(static.codes, eager.codes, static.audio, eager.audio):
        assert torch.equal(a, b)
        assert (wa - wb).abs().max() < 1e-5


def test_predictor_runner_equals_predict_when_sampling(tiny_model):
    talker = tiny_model.talker
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, talker.config.text.hidden_size, generator=g)
    code0 = torch.tensor([5, 17])
    sampling = SamplingConfig(do_sample=True, top_k=50, top_p=0.8)
    runner = graphs.predictor_runner(talker.code_predictor, 2, hidden.dtype, hidden.device)
    for _ in range(2):  # the runner is reused across frames
        ref = talker.predict_residual(hidden, code0, sampling, torch.Generator().manual_seed(7))
        codes, embeds = runner.run(hidden, talker.model.codec_embedding(code0), sampling,
                                   torch.Generator().manual_seed(7))
        assert torch.equal(codes, ref.codes)
        assert torch.allclose(embeds, ref.codec_embeds)
