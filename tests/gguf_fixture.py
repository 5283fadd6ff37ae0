"""A tiny random model written as a GGUF file, the way llama.cpp's converter writes one.

    path = write_tiny_gguf(tmp_path)                       # tmp_path / "tiny-llama.gguf"
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    load_base_model(ModelConfig(name=str(path)))           # lolcats' loader

The weights are ``conftest.tiny_model(arch, seed)`` (so the GGUF loads back to exactly that model),
stored as F32 under the ``gguf`` package's own tensor names; for ``llama`` the q/k rows are
permuted as llama.cpp does (transformers' GGUF loader undoes it). The vocabulary is a byte-level
BPE (``tokenizer.ggml.model = gpt2``, as SmolLM2's GGUF has) trained on conftest's words.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import WORDS, tiny_model

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (bos 1, eos 2, as SmolLM2)
GGUF_ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # arch -> gguf.MODEL_ARCH member
PERMUTED = ("llama",)  # archs whose q/k rows llama.cpp permutes (transformers' TENSOR_PROCESSORS)


def tiny_bpe(vocab_size: int = 320) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE trained on WORDS; the special tokens come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok.train_from_iterator(text, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[: len(SPECIAL)] == list(SPECIAL)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): (out, in) -> (out, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny ``arch`` model as GGUF to ``path`` (a .gguf file, or a directory to hold
    ``tiny-<arch>.gguf``); returns the file's path."""
    import gguf

    if arch not in GGUF_ARCHS:
        raise ValueError(f"write_tiny_gguf: arch {arch!r} is not supported; known: {sorted(GGUF_ARCHS)}")
    path = Path(path)
    if path.is_dir() or path.suffix != ".gguf":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"tiny-{arch}.gguf"
    tokens, merges = tiny_bpe()
    model = tiny_model(arch, seed, vocab_size=len(tokens))
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, GGUF_ARCHS[arch]), c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        a = t.detach().float().numpy()
        if arch in PERMUTED and base.endswith("q_proj") and suffix == "weight":
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch in PERMUTED and base.endswith("k_proj") and suffix == "weight":
            a = llama_cpp_permute(a, c.num_key_value_heads)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(a))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
