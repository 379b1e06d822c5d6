"""Placement across devices (issue 10): `from_pretrained(device={component: device})`, on CPU.

The code path is the one a two-GPU load takes ({"thinker": "cuda:0", "talker": "cuda:1", ...}): devices are
resolved per component, each component is materialised on its own device and read straight into it. On a
CPU-only machine every device is "cpu", so the checks are: the mapping is validated, every tensor ends up
materialised (none left on meta) on the device asked for, the weights and outputs equal a plain load, and the
helpers that move activations between components do what they say. With CUDA, one more test splits the model.
"""

from __future__ import annotations

import pytest
import torch

from qwen3omni.errors import InputError
from qwen3omni.model.omni import Qwen3Omni
from qwen3omni.model.placement import (
    device_of,
    dtype_of,
    placement,
    resolve_devices,
    to_device,
    unmaterialized,
)

CPU = torch.device("cpu")
ALL = ("thinker", "talker", "code2wav")


def test_resolve_devices_single_and_per_component():
    assert resolve_devices(None, ALL) == dict.fromkeys(ALL, CPU)
    assert resolve_devices("cpu", ("thinker",)) == {"thinker": CPU}
    mapping = {"thinker": "cpu", "talker": torch.device("cpu"), "code2wav": "cpu"}
    assert resolve_devices(mapping, ALL) == dict.fromkeys(ALL, CPU)
    # names of components that are not loaded are ignored: one mapping serves a thinker-only load too
    assert resolve_devices(mapping, ("thinker",)) == {"thinker": CPU}


@pytest.mark.parametrize(
    "device, message",
    [
        ({"thinker": "cpu", "talker": "cpu"}, "code2wav"),  # a loaded component without a device
        ({"thinker": "cpu", "talker": "cpu", "code2wav": "cpu", "vocoder": "cpu"}, "vocoder"),  # unknown name
        ({"thinker": "gpu:0", "talker": "cpu", "code2wav": "cpu"}, "device['thinker']"),  # not a device
        ("not-a-device", "device"),
    ],
)
def test_bad_device_mappings_raise_input_error(device, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_devices(device, ALL)


def test_per_component_load_equals_plain_load(tiny_checkpoint, tiny_model):
    devices = {"thinker": "cpu", "talker": "cpu", "code2wav": "cpu"}
    model = Qwen3Omni.from_pretrained(tiny_checkpoint.path, dtype=torch.float32, device=devices)
    assert placement(model) == dict.fromkeys(ALL, CPU)
    assert unmaterialized(model) == []
    for name in ALL:  # every tensor of every component on its device, computed buffers rebuilt
        part = getattr(model, name)
        assert {t.device for t in (*part.parameters(), *part.buffers())} == {CPU}
    plain = tiny_model.state_dict()
    ours = model.state_dict()
    assert ours.keys() == plain.keys()
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
    for (name, buf), (_, want) in zip(model.named_buffers(), tiny_model.named_buffers()):
        assert torch.equal(buf, want), name
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.thinker(input_ids=ids).logits, tiny_model.thinker(input_ids=ids).logits)


def test_thinker_only_load_with_full_mapping(tiny_checkpoint):
    devices = {"thinker": "cpu", "talker": "cpu", "code2wav": "cpu"}
    model = Qwen3Omni.from_pretrained(
        tiny_checkpoint.path, device=devices, components={"thinker"}, dtype=torch.bfloat16
    )
    assert placement(model) == {"thinker": CPU}
    assert unmaterialized(model) == []
    assert dtype_of(model.thinker) == torch.bfloat16


def test_bad_mapping_fails_before_reading(tiny_checkpoint):
    with pytest.raises(InputError, match="code2wav"):
        Qwen3Omni.from_pretrained(tiny_checkpoint.path, device={"thinker": "cpu", "talker": "cpu"})


def test_activation_helpers(tiny_model):
    assert device_of(tiny_model.talker) == CPU and device_of(None) == CPU
    assert device_of(torch.nn.Module()) == CPU
    x = torch.ones(2)
    assert to_device(x, "cpu") is x  # already there: no copy
    moved = to_device({"a": (x, [x, 3]), "b": None}, CPU)
    assert moved["a"][0] is x and moved["a"][1][0] is x and moved["a"][1][1] == 3 and moved["b"] is None
    meta = to_device((x, {"k": x}), "meta")
    assert meta[0].is_meta and meta[1]["k"].is_meta


def test_thinker_states_reach_the_talker_through_to_device(tiny_model):
    """The hand-over generation does: thinker hidden states and embeddings, moved to the talker's device,
    through the talker's projections, then codes moved to Code2Wav's device."""
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    talker, code2wav = tiny_model.talker, tiny_model.code2wav
    with torch.no_grad():
        out = tiny_model.thinker(input_ids=ids, output_hidden_states=True)
        layer = tiny_model.config.talker.accept_hidden_layer
        hidden = to_device(out.hidden_states[layer], device_of(talker))
        embeds = to_device(tiny_model.thinker.model.embed_tokens(ids), device_of(talker))
        projected = talker.hidden_projection(hidden) + talker.text_projection(embeds)
        assert projected.device == device_of(talker) and torch.isfinite(projected).all()
        codes = torch.zeros(1, tiny_model.config.code2wav.num_quantizers, 3, dtype=torch.long)
        wav = code2wav(to_device(codes, device_of(code2wav)))
    assert wav.device == device_of(code2wav)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA device")
def test_split_across_cpu_and_cuda(tiny_checkpoint, tiny_model):
    devices = {"thinker": "cuda:0", "talker": "cpu", "code2wav": "cuda:0"}
    model = Qwen3Omni.from_pretrained(tiny_checkpoint.path, dtype=torch.float32, device=devices)
    assert placement(model) == {k: torch.device(v) for k, v in devices.items()}
    assert unmaterialized(model) == []
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.thinker(input_ids=ids.cuda()).logits.cpu()
        want = tiny_model.thinker(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-4
