"""Exports travel: a linearized model trained on a GGUF or a safetensors base exports to a directory
that plain transformers loads (trust_remote_code=True) in a process where lolcats cannot be
imported, with the same logits and greedy text as ``load_linearized`` and constant-memory generate."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from conftest import save_tiny, write_alpaca
from gguf_fixture import write_tiny_gguf
from lolcats.bundle import BundleError, parse
from lolcats.cli import main
from lolcats.config import AttentionConfig, ModelConfig
from lolcats.pipeline import linearize, load_linearized, stage_dirs
from test_pipeline import make_cfg

PROMPT = "the cat sat on the mat and"
NEW_TOKENS = 8
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Run with `python -I` and lolcats (plus, optionally, more packages) blocked at the import system,
# so an editable install's finder cannot supply it either.
PROBE = textwrap.dedent('''
    import importlib.abc, json, os, sys

    BLOCKED = set(sys.argv[3].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, Block())
    try:
        import lolcats  # noqa: F401
        lolcats_importable = True
    except ModuleNotFoundError:
        lolcats_importable = False

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.dynamic_module_utils import check_imports

    out, result = sys.argv[1], {"lolcats_importable": lolcats_importable}
    for f in sorted(os.listdir(out)):  # what transformers checks of each file it fetches from the Hub
        if f.endswith(".py"):
            check_imports(os.path.join(out, f))
    try:
        AutoModelForCausalLM.from_pretrained(out)
        result["loads_without_trust"] = True
    except ValueError as e:
        result["loads_without_trust"] = "trust_remote_code" not in str(e)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ops = sys.modules[type(model).__module__.rpartition(".")[0] + ".lolcats_ops"]

    def run(name):
        ids = torch.tensor([tok(sys.argv[4]).input_ids])
        with torch.no_grad():
            logits = model(ids).logits
        nbytes = []
        for n in (2, int(sys.argv[5])):
            g = model.generate(ids, max_new_tokens=n, do_sample=False, return_dict_in_generate=True)
            cache = g.get("cache", g.get("past_key_values"))
            nbytes.append(cache.state_nbytes())
        result[name] = {"ids": ids[0].tolist(), "text": tok.decode(g.sequences[0]), "cache": type(cache).__name__,
                        "state_nbytes": nbytes, "backend": ops.get_backend("auto", logits).name}
        torch.save(logits, os.path.join(sys.argv[2], f"{name}.pt"))

    run("torch")
    result["backends"] = sorted(ops.BACKENDS)
    result["class"] = type(model).__name__
    if "triton" in ops.BACKENDS:
        os.environ["LOLCATS_TRITON_ON_CPU"] = "1"  # the bundled kernels, in Triton's interpreter
        run("triton")
        del os.environ["LOLCATS_TRITON_ON_CPU"]
    model.save_pretrained(os.path.join(sys.argv[2], "resaved"))
    again = AutoModelForCausalLM.from_pretrained(os.path.join(sys.argv[2], "resaved"), trust_remote_code=True)
    with torch.no_grad():
        torch.save(again(torch.tensor([result["torch"]["ids"]])).logits, os.path.join(sys.argv[2], "resaved.pt"))
    with open(os.path.join(sys.argv[2], "result.json"), "w") as f:
        json.dump(result, f)
''')


def probe(out, work, blocked=("lolcats",)) -> dict:
    """Load the export ``out`` in a fresh ``python -I`` with ``blocked`` packages unimportable."""
    script = work / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOLCATS_TRITON_ON_CPU", None)
    done = subprocess.run([sys.executable, "-I", str(script), str(out), str(work), ",".join(blocked), PROMPT,
                           str(NEW_TOKENS)], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((work / "result.json").read_text())


def reference(checkpoint):
    """Logits, prompt ids and greedy text of ``load_linearized`` on the stage-2 checkpoint."""
    model, tok = load_linearized(None, None, str(checkpoint), device="cpu", dtype="float32")
    ids = torch.tensor([tok(PROMPT).input_ids])
    with torch.no_grad():
        logits = model(ids).logits
        seq = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert seq.shape[1] > ids.shape[1]
    return {"ids": ids[0].tolist(), "logits": logits, "text": tok.decode(seq[0])}


@pytest.fixture(scope="module", params=["gguf", "safetensors"])
def exported(request, tmp_path_factory):
    """(base kind, stage-2 checkpoint, export directory) after 2 + 2 training steps and `lolcats export`."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    base = write_tiny_gguf(root / "base") if request.param == "gguf" else save_tiny(root / "base")
    cfg = make_cfg(root, base, write_alpaca(root / "alpaca.jsonl", n=60),
                   **{"distill.max_steps": 2, "finetune.max_steps": 2, "distill.eval_every": 2,
                      "finetune.eval_every": 2})
    linearize(cfg)
    checkpoint = stage_dirs(cfg)[1] / "best"
    out = root / "export"
    assert main(["export", str(out), "--checkpoint", str(checkpoint)]) == 0
    return request.param, checkpoint, out


def test_export_loads_without_lolcats_with_the_same_logits_and_text(exported, tmp_path):
    """The GGUF-based export also runs the bundled Triton kernels (in Triton's interpreter); the other
    one loads where triton is missing too (a Hub download on a Mac): every file passes transformers'
    requirement check and the model runs the PyTorch path."""
    kind, checkpoint, out = exported
    blocked = ("lolcats",) if kind == "gguf" else ("lolcats", "triton", "fla")
    ref = reference(checkpoint)
    got = probe(out, tmp_path, blocked)
    assert not got["lolcats_importable"]
    assert not got["loads_without_trust"]  # no silent softmax model: transformers asks for trust_remote_code
    assert got["class"] == "LolcatsLlamaForCausalLM"
    with_triton = HAS_TRITON and "triton" not in blocked
    assert "torch" in got["backends"] and ("triton" in got["backends"]) == with_triton
    for name in ["torch"] + (["triton"] if with_triton else []):
        r = got[name]
        assert r["backend"] == name
        assert r["ids"] == ref["ids"]
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.pt"), ref["logits"], rtol=1e-5, atol=1e-5)
        assert r["text"] == ref["text"]
        assert r["cache"] == "LolcatsCache"
        assert r["state_nbytes"][0] == r["state_nbytes"][1] > 0  # constant in the generated length
    torch.testing.assert_close(torch.load(tmp_path / "resaved.pt"), ref["logits"], rtol=1e-5, atol=1e-5)


def test_export_directory_is_clean_and_names_its_code(exported):
    _, _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lolcats_llama"
    assert config["architectures"] == ["LolcatsLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "modeling_lolcats.LolcatsLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_lolcats.LolcatsLlamaForCausalLM"}
    assert "quantization_config" not in config
    AttentionConfig(**config["lolcats_attention"])
    assert (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    for py in out.glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] == "lolcats" for n in names), (py.name, ast.unparse(node))


def test_installed_lolcats_loads_the_export_without_trust_remote_code(exported):
    import lolcats.hf
    from transformers import AutoModelForCausalLM

    _, checkpoint, out = exported
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is lolcats.hf.REGISTERED["llama"][1]
    ref = reference(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ref["ids"]])).logits, ref["logits"], rtol=1e-5, atol=1e-5)


def test_gguf_base_loads_dense_and_unmarked(tmp_path):
    """transformers leaves a GGUF model marked quantized unless asked to dequantize; save_pretrained
    then refuses it (the `lolcats export` error on transformers 5.17)."""
    from lolcats.models.loading import load_base_model

    model = load_base_model(ModelConfig(name=str(write_tiny_gguf(tmp_path))), "cpu")
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")


def test_export_model_of_a_gguf_model_loaded_by_hand(tmp_path):
    """A model from plain from_pretrained(gguf_file=...) is still marked quantized; export clears it
    and writes the weights in the asked dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lolcats.attention.convert import convert_model
    from lolcats.hf import export_model

    path = write_tiny_gguf(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert model.hf_quantizer is not None
    convert_model(model, AttentionConfig(window_size=8, feature_dim=8))
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    out = export_model(model, tok, tmp_path / "export", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == torch.bfloat16 and back.config.model_type == "lolcats_llama"


def test_export_of_an_unconverted_model_is_a_clear_error(tmp_path):
    from conftest import tiny_model
    from lolcats.hf import export_model

    with pytest.raises(ValueError, match="converted model"):
        export_model(tiny_model(), None, tmp_path / "export")


@pytest.mark.parametrize("line, why", [("import lolcats.ops", "binds the package"),
                                       ("from lolcats.ops import triton_backend", "is a module"),
                                       ("from . import naive", "is a module")])
def test_bundler_refuses_imports_it_cannot_make_relative(line, why):
    with pytest.raises(BundleError, match=why):
        parse("lolcats.ops.linear.naive", f"x = 1\n{line}\n")


def test_bundler_wraps_optional_imports_and_rewrites_module_names(tmp_path):
    from lolcats.bundle import rewrite

    src = parse("lolcats.ops.linear.naive", textwrap.dedent('''
        """doc naming lolcats.ops"""
        import torch
        import triton
        import triton.language as tl
        from lolcats.ops.hybrid.naive import (hybrid_attention_naive,
                                              window_masks as wm)
        NAME = "lolcats.ops.triton_backend"
        def f():
            from .naive import EPS  # relative in the source
            return NAME
    '''))
    text = rewrite(src, optional={"triton"})
    ast.parse(text)
    assert "try:  # optional package" in text and text.count("except ImportError:\n    raise") == 1
    assert "    import triton\n    import triton.language as tl\n" in text
    assert "from .lolcats_ops_hybrid_naive import hybrid_attention_naive, window_masks as wm" in text
    assert 'NAME = (__package__ + ".lolcats_ops_triton_backend")' in text
    assert "from .lolcats_ops_linear_naive import EPS  # relative in the source" in text
    assert '"""doc naming lolcats.ops"""' in text and "import torch\n" in text
