"""Shared fixtures: tiny random models and a tiny tokenizer, built in code (no downloads)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

WORDS = ("the a cat dog sat on mat and ran to house big small red blue green tree sky is was "
         "what why how who where when you i we they it of in for with answer question response "
         "instruction input below task write that describes request").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def src_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process, with this checkout's ``src`` first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            **extra}


def torchrun_two(script: str, *args: str, device: str = "cpu", timeout: int = 300) -> None:
    """Run ``script`` (a test file whose ``__main__`` half is the per-rank work) in two processes under
    ``torch.distributed.run``, this checkout's ``src`` first on the path; assert that it succeeded."""
    env = {k: v for k, v in src_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,:;!?#-_()'\"\n"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")


def tiny_config(arch: str = "llama", vocab_size: int = 128, layers: int = 2, **fields):
    """A tiny config of ``arch``; ``fields`` are more of its fields (e.g. hidden_act, mlp_bias)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, **fields)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **kw), attn_implementation="sdpa").eval()


def save_tiny(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    tok = tiny_tokenizer()
    model = tiny_model(arch, seed, vocab_size=len(tok.get_vocab()))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_alpaca(path: Path, n: int = 120, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist())
        rows.append({"instruction": pick(6), "input": pick(3) if i % 2 else "", "output": pick(20)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls are far faster on one thread, above all on a busy 2-core machine
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory) -> Path:
    return write_alpaca(tmp_path_factory.mktemp("data") / "alpaca.jsonl")


@pytest.fixture(scope="session", autouse=True)
def _converted_gguf_cache(tmp_path_factory):
    """Converted GGUF copies (lolcats.models.gguf_cache) go to a temporary folder, not ~/.cache."""
    if "LOLCATS_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["LOLCATS_CACHE_DIR"] = str(tmp_path_factory.mktemp("lolcats-cache"))
    yield
    os.environ.pop("LOLCATS_CACHE_DIR", None)
