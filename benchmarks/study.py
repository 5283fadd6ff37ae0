"""One row of the SmolLM2 study: linearize with a config (plus overrides), then validation
perplexity of the base model and of the result on extra files; writes a JSON report and
copies the small checkpoints next to it.

    python benchmarks/study.py --out OUT_DIR --label default --ppl ../shared/data/wikitext-2/wiki.test.tokens \
        --config configs/smollm2-135m.yaml --data.train ../shared/data/train/alpaca_52k_en.jsonl.gz [--section.key VALUE ...]

Writes OUT_DIR/LABEL/report.json (both stages' summaries, base and linearized perplexities) and
the two stage directories as the run has them (distill-*/ and finetune-*/, each with best/ and
summary.json), so ``lolcats generate --checkpoint OUT_DIR/LABEL/finetune-*/best`` works. The rows of the study
and their flags are in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lolcats.config import load_config
from lolcats.evaluation.report import format_report
from lolcats.pipeline import linearize, load_linearized, stage_dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="default")
    ap.add_argument("--ppl", nargs="*", default=[])
    ap.add_argument("--config", action="append", help="YAML config file(s); repeat to combine")
    a, rest = ap.parse_known_args()
    cfg = load_config(a.config, rest)
    out = Path(a.out) / a.label
    out.mkdir(parents=True, exist_ok=True)
    report = linearize(cfg)
    print(format_report(report), flush=True)
    d1, d2 = stage_dirs(cfg)
    from lolcats.evaluation.perplexity import perplexity
    from lolcats.models.loading import load_base_model, load_tokenizer

    extra = {}
    for label, loader in (("base", lambda: (load_base_model(cfg.model), load_tokenizer(cfg.model))),
                          ("linearized", lambda: load_linearized(None, str(d1 / "best"), str(d2 / "best")))):
        model, tok = loader()
        for f in a.ppl:
            t = time.time()
            extra[f"{label}:{Path(f).name}"] = {**perplexity(model, tok, f, mode="packed", seq_len=cfg.data.seq_len,
                                                             batch_size=8), "seconds": time.time() - t}
        del model
    report["extra_ppl"] = extra
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for d in (d1, d2):  # the run layout: stage 2's meta names ../<d1>/best
        shutil.copytree(d / "best", out / d.name / "best", dirs_exist_ok=True)
        shutil.copy(d / "summary.json", out / d.name / "summary.json")
    print(json.dumps(extra, indent=2))


if __name__ == "__main__":
    main()
