"""Which context does the base model need to retrieve a passkey? Softmax attention cut to a mask, no training.

Each row runs the base (softmax) model with its attention restricted, in the layers the row names, to what a
linearized layer attends exactly: the last ``--window`` tokens, optionally the first ``sink`` tokens (the
chat template's system prompt and the instructions) and optionally the asked key sentence itself (an oracle
sparse cache that caught the key). The other layers keep full attention. Passkey accuracy per row answers,
before any training, whether kept softmax layers, a sparse cache or a sink could bring retrieval back:

    python -m experiments.recall_masks --model smollm2-135m-instruct --lengths 1024 --samples 10 \\
        --rows "full;window all;window all, keep 4,7,8,21;window 23,24,27,29;window all, sink 32, key"

A row is ``full`` or ``window LAYERS`` (``all`` or a list, ``all, keep LIST`` for every layer but those),
then optional ``sink N`` and ``key``, comma-separated. Prompts are the recall evaluation's (seeded, chat
template), decoded greedily one prompt at a time (the key's span differs per prompt).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch
from benchmarks.common import write_json

MASK_NAME = "lolcats_recall_mask"


@dataclass(frozen=True)
class MaskRow:
    label: str
    layers: frozenset[int] | None  # layers under the mask; None = none (full attention)
    sink: int = 0
    key: bool = False


def parse_row(text: str, num_layers: int) -> MaskRow:
    """``full`` | ``window all[, keep 1,2]`` | ``window 3,4`` then ``, sink N`` / ``, key``."""
    t = " ".join(text.split())
    if t == "full":
        return MaskRow(t, None)
    m = re.fullmatch(r"window (all(?:, keep [\d,]+)?|[\d,]+)((?:, (?:sink \d+|key))*)", t)
    if not m:
        raise ValueError(f"row {text!r}: expected 'full' or 'window all|LIST[, keep LIST][, sink N][, key]'")
    spec = m.group(1)
    listed = {int(x) for x in spec.split("keep ")[-1].split(",") if x.isdigit()}  # kept, or windowed
    if any(i >= num_layers for i in listed):
        raise ValueError(f"row {text!r}: the model has {num_layers} layers")
    layers = frozenset(range(num_layers)) - listed if spec.startswith("all") else frozenset(listed)
    sink = re.search(r"sink (\d+)", m.group(2))
    return MaskRow(t, layers, int(sink.group(1)) if sink else 0, ", key" in m.group(2))


def allowed(q_len: int, k_len: int, window: int, sink: int, span: tuple[int, int]) -> torch.Tensor:
    """(q_len, k_len) bool: causal, and inside the window, the sink or the span; queries are the last q_len."""
    qpos = torch.arange(k_len - q_len, k_len)[:, None]
    kpos = torch.arange(k_len)[None]
    seen = (kpos > qpos - window) | (kpos < sink) | ((kpos >= span[0]) & (kpos < span[1]))
    return (kpos <= qpos) & seen


class Masker:
    """The attention function registered with transformers: full attention, or the row's mask in its layers."""

    def __init__(self, window: int):
        self.window, self.row, self.span = window, MaskRow("full", None), (0, 0)

    def __call__(self, module, query, key, value, attention_mask, **kw):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if self.row.layers is None or module.layer_idx not in self.row.layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        ok = allowed(query.shape[2], key.shape[2], self.window, self.row.sink,  # query (B, H, q, D)
                     self.span if self.row.key else (0, 0)).to(query.device)
        mask = torch.zeros(ok.shape, dtype=query.dtype, device=query.device).masked_fill(~ok, float("-inf"))
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, mask[None, None], is_causal=False, **kw)


def run(model, tok, rows: list[MaskRow], lengths: list[int], samples: int, window: int) -> list[dict]:
    from transformers import AttentionInterface

    from lolcats.evaluation.recall import build_samples, generate_answers, is_hit, recall_settings

    masker = Masker(window)
    AttentionInterface.register(MASK_NAME, masker)
    model.set_attn_implementation(MASK_NAME)
    out = []
    for n in lengths:
        prompts = build_samples(tok, "passkey", n, recall_settings("passkey", [n], samples=samples))
        for row in rows:
            masker.row, hits, said = row, [], []
            for s in prompts:
                masker.span = (s.key_start, s.key_start + s.key_len)
                text = generate_answers(model, tok, [s], batch_size=1, max_new_tokens=12)[0]
                hits.append(is_hit(text, s))
                said.append(text)
            out.append({"row": row.label, "length": n, "hits": sum(hits), "samples": len(hits), "outputs": said})
            print(f"| {row.label} | {n} | {sum(hits)}/{len(hits)} | {said[0][:40]!r} |", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="the base model (a name, a directory, a .gguf)")
    p.add_argument("--rows", default="full;window all;window all, keep 4,7,8,21;window all, sink 32, key")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)

    from lolcats.models.trained import ModelSource, load_trained

    torch.manual_seed(0)
    model, tok = load_trained(ModelSource(base=a.model), a.device, "float32" if a.device == "cpu" else "auto")
    rows = [parse_row(r, model.config.num_hidden_layers) for r in a.rows.split(";") if r.strip()]
    print(f"base {a.model}; softmax attention masked to window {a.window} (+ sink, + key) in the rows' layers")
    print("| row | tokens | passkey | first answer |\n|---|---|---|---|")
    res = run(model, tok, rows, [int(x) for x in a.lengths.split(",")], a.samples, a.window)
    if a.out:
        write_json(a.out, {"model": a.model, "window": a.window, "rows": res})


if __name__ == "__main__":
    sys.exit(main())
