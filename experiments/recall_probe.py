"""Why does a converted model miss a passkey? What its sparse cache holds, and what it answers with the key pinned.

For a trained checkpoint (stage 1 or stage 2) with LoLA's sparse cache on, each recall prompt is run twice:

* **occupancy**: after the prefill, per converted layer, how many of the asked key sentence's tokens each KV
  head's sparse cache holds (``sparse_pos``): did the selection catch the key?
* **answers**: greedy answers as the settings give them and, with ``--pin-key``, with the key sentence's
  pairs always kept in every layer's cache (an oracle selection: its score +inf, as the sink's): could the
  model use the key if the cache held it?

Rows vary ``--linear-scales`` (``attention.linear_scale``: the weight of the linear terms against the
softmax ones), so one run separates a selection that misses the key from a linear part that swamps it:

    python -m experiments.recall_probe --checkpoint RUN/finetune-*/best --sparse-cache 128 --sparse-sink 64 \\
        --linear-scales 1,0.3,0 --pin-key --lengths 1024 --samples 8 --out probe.json

Prompts are the recall evaluation's (seeded, chat template; the first ``--samples`` of ``lolcats eval``'s),
answered one at a time on the CPU in float32 by default.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from benchmarks.common import write_json


@contextlib.contextmanager
def key_pinned(span: list[int], score: str):
    """While open, the sparse cache's ``score`` keeps the pairs at positions span[0] <= p < span[1] whatever
    their score (``span`` is read at each eviction: the caller moves it per prompt)."""
    from lolcats.ops.sparse import SCORES, register_score

    base = SCORES[score]

    def pinned(v, fk, pos, kv, ks):
        return base(v, fk, pos, kv, ks).masked_fill((pos >= span[0]) & (pos < span[1]), float("inf"))

    register_score(score, pinned)
    try:
        yield
    finally:
        register_score(score, base)


@torch.no_grad()
def occupancy(model, sample) -> dict[int, list[int]]:
    """{layer: key-sentence tokens in each KV head's sparse cache} after ``sample``'s prefill."""
    from lolcats.attention.generate import cache_kwarg_name, make_cache
    from lolcats.evaluation.perplexity import model_device

    cache = make_cache(model)
    ids = torch.tensor([sample.ids], device=model_device(model))
    model(input_ids=ids, use_cache=True, **{cache_kwarg_name(model): cache})
    lo, hi = sample.key_start, sample.key_start + sample.key_len
    out = {}
    for layer, st in sorted(cache.states().items()):
        pos = getattr(st, "sparse_pos", None)
        if pos is not None and pos.numel():
            out[layer] = ((pos[0] >= lo) & (pos[0] < hi)).sum(-1).tolist()  # (Hk,)
    return out


def run(model, tok, lengths: list[int], samples: int, scales: list[float], pin: bool) -> list[dict]:
    from lolcats.attention.layers import lolcats_modules
    from lolcats.attention.use import set_linear_scale
    from lolcats.evaluation.recall import build_samples, generate_answers, is_hit, recall_settings

    score = next(m.cfg.sparse_score for m in lolcats_modules(model) if m.converted)
    rows = []
    for n in lengths:
        prompts = build_samples(tok, "passkey", n, recall_settings("passkey", [n], samples=samples))
        held = [occupancy(model, s) for s in prompts]
        for scale in scales:
            set_linear_scale(model, scale)
            for pinned in (False, True) if pin else (False,):
                span = [0, 0]
                hits, said = [], []
                with key_pinned(span, score) if pinned else contextlib.nullcontext():
                    for s in prompts:
                        span[:] = [s.key_start, s.key_start + s.key_len]
                        text = generate_answers(model, tok, [s], batch_size=1, max_new_tokens=12)[0]
                        hits.append(is_hit(text, s))
                        said.append(text)
                rows.append({"length": n, "linear_scale": scale, "key_pinned": pinned, "hits": sum(hits),
                             "samples": len(hits), "outputs": said, "depths": [s.depth for s in prompts]})
                print(f"| {n} | {scale:g} | {'yes' if pinned else 'no'} | {sum(hits)}/{len(hits)} | "
                      f"{said[0][:40]!r} |", flush=True)
        rows.append({"length": n, "occupancy": held, "key_tokens": [s.key_len for s in prompts]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a stage-1 or stage-2 checkpoint directory (.../best)")
    p.add_argument("--base", help="the base model, where the checkpoint's recorded one is not found here")
    p.add_argument("--sparse-cache", type=int, default=128)
    p.add_argument("--sparse-sink", type=int, default=64)
    p.add_argument("--linear-scales", default="1,0.3", help="comma list of attention.linear_scale values")
    p.add_argument("--pin-key", action="store_true", help="also answer with the key sentence pinned in the cache")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)

    from lolcats.config import UseSettings
    from lolcats.models.trained import ModelSource, load_trained

    source = ModelSource(checkpoint=a.checkpoint, base=a.base,
                         use=UseSettings(sparse_cache=a.sparse_cache, sparse_sink=a.sparse_sink))
    model, tok = load_trained(source, a.device, "float32" if a.device == "cpu" else "auto")
    print(f"{a.checkpoint}; sparse cache {a.sparse_cache}, sink {a.sparse_sink}")
    print("| tokens | linear scale | key pinned | passkey | first answer |\n|---|---|---|---|---|")
    rows = run(model, tok, [int(x) for x in a.lengths.split(",")], a.samples,
               [float(x) for x in a.linear_scales.split(",")], a.pin_key)
    for r in rows:
        if "occupancy" in r:
            layers = sorted({k for h in r["occupancy"] for k in h})
            mean = {k: round(sum(sum(h[k]) / len(h[k]) for h in r["occupancy"]) / len(r["occupancy"]), 1)
                    for k in layers}
            print(f"{r['length']} tokens: key-sentence tokens per KV head in the cache, mean by layer: {mean}")
    if a.out:
        write_json(a.out, {"checkpoint": a.checkpoint, "sparse_cache": a.sparse_cache, "sparse_sink": a.sparse_sink,
                           "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
