"""Safety (issue 9): only safetensors are ever read, nothing from a checkpoint folder is executed, and nothing
touches the network.

The runtime checks load a booby-trapped folder in a fresh interpreter under a `sys.addaudithook` recorder, which
sees every file opened, module imported, code object executed, pickle class looked up and socket created,
whoever does it (our code, transformers, tokenizers). The folder holds a working tiny checkpoint plus a
`pytorch_model.bin` whose unpickling would create a marker file, and `.py` files (named by `auto_map` entries in
config.json and tokenizer_config.json) whose import would create another.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from processor_fixtures import make_checkpoint_folder

from qwen3omni.demo import random_init_, tiny_config
from qwen3omni.model.omni import Qwen3Omni

PACKAGE = Path(__file__).resolve().parents[1] / "qwen3omni"

# ---- the source never reads pickles or runs dynamic code ----------------------------------------------------------
FORBIDDEN = {
    "torch.load": r"\btorch\.load\s*\(|\bjit\.load\s*\(",
    "pickle": r"\b(c?pickle|dill|joblib|cloudpickle|marshal)\b\s*(\.|import)|^\s*import\s+(c?pickle|dill|marshal)\b",
    "numpy pickles": r"allow_pickle\s*=\s*True",
    "unsafe torch.load": r"weights_only\s*=\s*False",
    "eval/exec": r"(?<![\w.])(eval|exec)\s*\(",
    "remote code": r"trust_remote_code\s*=\s*(?!False\b)",
    "dynamic import": r"\b(runpy|spec_from_file_location|SourceFileLoader|exec_module|__import__|import_module)\b"
                      r"|importlib\.(util|machinery)|from importlib import (util|machinery|import_module)",
    "sys.path": r"\bsys\.path\b",
}


# Reviewed exceptions, by file and exact line: each imports only a fixed module of this package.
ALLOWED = {
    ("qwen3omni/__init__.py", "from importlib import import_module"),
    ("qwen3omni/__init__.py", "return getattr(import_module(_WHERE[name], __name__), name)"),  # lazy public names
}


def violations(text: str, name: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        if code.lstrip().startswith(('"', "'")) or (name, code.strip()) in ALLOWED:  # docstring prose, reviewed
            continue
        for what, pattern in FORBIDDEN.items():
            if re.search(pattern, code):
                found.append(f"{name}:{number}: {what}: {line.strip()}")
    return found


def test_the_scanner_finds_each_kind_of_violation():
    planted = [
        "state = torch.load(path)", "import pickle", "obj = pickle.loads(data)", "np.load(f, allow_pickle=True)",
        "torch.load(f, weights_only=False)", "value = eval(text)", "exec(code, env)",
        "AutoTokenizer.from_pretrained(p, trust_remote_code=True)", "mod = importlib.import_module(name)",
        "from importlib import util", "sys.path.insert(0, folder)", "m = torch.jit.load(f)",
    ]
    for line in planted:
        assert violations(line, "x.py"), line
    for line in ["model.eval()", "x.exec_mode = 1", "from importlib import resources",
                 "AutoTokenizer.from_pretrained(p, trust_remote_code=False)", "# torch.load is never used",
                 '"""no pickle is read"""']:
        assert not violations(line, "x.py"), line


def test_no_pickle_or_dynamic_code_in_the_package():
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        found += violations(file.read_text(), str(file.relative_to(PACKAGE.parent)))
    assert not found, "\n".join(found)


# ---- runtime: a booby-trapped folder, loaded under an audit hook ---------------------------------------------------
class _Trap:
    """Unpickling this creates the marker file (what a malicious pytorch_model.bin would do, harmlessly)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, markers: Path) -> None:
    markers.mkdir(exist_ok=True)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Trap(str(markers / "unpickled"))}, f)
    code = f"open({str(markers / 'imported')!r}, 'w').close()\n"
    for name in ("__init__.py", "modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))


RUNNER = textwrap.dedent(
    """
    import json, os, socket, sys
    FOLDER = os.path.realpath(sys.argv[1])
    SCENARIO = sys.argv[2]
    CODE = (".py", ".pyc", ".so", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
    seen = []

    def inside(path):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:
            return None
        return p if p == FOLDER or p.startswith(FOLDER + os.sep) else None

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            p = inside(args[0])
            if p and p.endswith(CODE):
                seen.append(["open", p])
        elif event == "exec" and inside(getattr(args[0], "co_filename", "") or ""):
            seen.append(["exec", args[0].co_filename])
        elif event == "pickle.find_class":
            seen.append(["unpickle", str(args)])
        elif event.startswith(("socket.", "urllib.", "http.")):
            seen.append(["network", event])

    sys.addaudithook(hook)

    class NoNetwork(socket.socket):
        def __init__(self, *args, **kwargs):
            seen.append(["network", "socket.socket()"])
            raise OSError("network access is not allowed in this test")

    socket.socket = NoNetwork

    import torch
    from qwen3omni import Processor, Qwen3Omni
    from qwen3omni.errors import Qwen3OmniError

    outcome = {}
    try:
        if SCENARIO == "full":
            processor = Processor.from_pretrained(FOLDER)
            model = Qwen3Omni.from_pretrained(FOLDER, dtype=torch.float32)
            batch = processor([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
            res = model.generate(**batch, max_new_tokens=2, talker_do_sample=False, talker_max_new_tokens=2)
            outcome["new_tokens"] = res.sequences.shape[1] - batch["input_ids"].shape[1]
        elif SCENARIO == "bin_only":
            Qwen3Omni.from_pretrained(FOLDER)
        else:  # calibration: do each forbidden thing once; the recorder must see every one
            import pickle
            with open(os.path.join(FOLDER, "pytorch_model.bin"), "rb") as f:
                pickle.load(f)
            sys.path.insert(0, FOLDER)
            import modeling_evil  # noqa: F401
            try:
                socket.create_connection(("localhost", 9), timeout=1)
            except OSError:
                pass
    except Qwen3OmniError as e:
        outcome["error"] = [type(e).__name__, str(e)]
    seen += [["import", name, m.__file__] for name, m in list(sys.modules.items())
             if inside(getattr(m, "__file__", None) or "")]
    print(json.dumps({"outcome": outcome, "seen": seen}))
    """
)


def run_guarded(folder: Path, scenario: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(folder.parent / "hf_home")  # no cache to fall back on
    done = subprocess.run([sys.executable, "-c", RUNNER, str(folder), scenario], capture_output=True, text=True,
                          env=env, cwd=str(folder.parent), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trapped(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    random_init_(Qwen3Omni(tiny_config()), seed=0).save_pretrained(root / "ckpt")
    make_checkpoint_folder(root / "ckpt", role_tokens=True)
    plant(root / "ckpt", root / "markers")
    return root / "ckpt"


def test_the_traps_and_the_recorder_work(trapped, tmp_path):
    """Calibration: in a copy of the folder, unpickling the .bin, importing a planted module and opening a socket
    do fire the traps, and the recorder sees each of them."""
    folder = tmp_path / "calibration"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (folder / name).write_bytes((trapped / name).read_bytes())
    plant(folder, tmp_path / "markers")
    report = run_guarded(folder, "calibrate")
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == ["imported", "unpickled"]
    kinds = {entry[0] for entry in report["seen"]}
    assert {"open", "unpickle", "import", "exec", "network"} <= kinds, report["seen"]
    opened = {Path(entry[1]).name for entry in report["seen"] if entry[0] == "open"}
    assert {"pytorch_model.bin", "modeling_evil.py"} <= opened


def test_loading_and_generating_reads_only_safetensors_runs_no_folder_code_and_stays_offline(trapped):
    before = (trapped / "pytorch_model.bin").read_bytes()
    report = run_guarded(trapped, "full")
    assert report["outcome"].get("new_tokens") == 2, report["outcome"]
    assert report["seen"] == [], report["seen"]
    assert not any((trapped.parent / "markers").iterdir()), "a planted file was unpickled or imported"
    assert (trapped / "pytorch_model.bin").read_bytes() == before


def test_a_pickle_only_folder_is_refused_unread(trapped, tmp_path):
    folder = tmp_path / "pickle_only"
    folder.mkdir()
    (folder / "config.json").write_bytes((trapped / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes((trapped / "pytorch_model.bin").read_bytes())
    report = run_guarded(folder, "bin_only")
    kind, message = report["outcome"]["error"]
    assert kind == "CheckpointError" and "only safetensors" in message and str(folder) in message
    assert report["seen"] == [], report["seen"]
    assert not any((trapped.parent / "markers").iterdir())
