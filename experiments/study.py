"""The SmolLM2 study: every row trained and evaluated with the project's own commands, rows in parallel.

A row is a `lolcats linearize` with the study's common flags plus the row's own, then `lolcats eval`
on its stage-2 checkpoint (WikiText-2 test perplexity, PIQA / ARC-Easy / ARC-Challenge on the full
sets, RULER's needle tasks in WikiText and passkey at 1K-8K tokens, the answer led in) and a second
`lolcats eval` for MMLU 5-shot on ``--mmlu-limit`` questions per subject. Eval-only rows evaluate the base
model, or another row's checkpoint with extra model flags (e.g. a sparse cache at eval time). Up to ``--jobs``
rows run at once on one GPU; every command, its log and its JSON land under ``--out``; ``study.md`` (the
table) and ``study.json`` are rewritten whenever a row finishes, so a run cut short keeps what it measured.

    python -m experiments.study --out OUT --model PATH/smollm2.gguf --data DIR --eval-data DIR --jobs 4 \
        [--rows default,kl,...] [--tokens 2500000] [--list]

``--data``: a folder with the training files the rows name (alpaca_52k_en.jsonl.gz, and for the data-mix
row wikipedia/gutenberg files); ``--eval-data``: a folder with ``lm_eval_local/`` (its YAMLs pointing at
the data files, resolved as lolcats eval does); ``--ppl``: WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO
from lolcats.config import load_config, use_flags
from lolcats.evaluation.harness import localized_include_path

RECIPE = REPO / "configs" / "smollm2-135m.yaml"  # the README's SmolLM2 recipe, which the study chose
ZERO_SHOT = "piqa_local,arc_easy_local,arc_challenge_local"


@dataclass
class Row:
    label: str
    title: str
    flags: list[str] = field(default_factory=list)  # added to the common linearize flags
    train: bool = True
    data: list[str] | None = None  # training files (names inside --data); default: alpaca only
    checkpoint_of: str | None = None  # eval-only: evaluate this row's checkpoint
    eval_flags: list[str] = field(default_factory=list)  # added to the model flags of lolcats eval
    config: Path | None = None  # train with this config file as it is (data, model and output given), not the study's


ALPACA = "alpaca_52k_en.jsonl.gz"
MIX = [ALPACA, "wikipedia_en_enwiki_chunk.jsonl.gz", "gutenberg_en_books.jsonl.gz"]
LONG = ["--data.seq_len", "4096", "--distill.micro_batch_size", "2", "--finetune.micro_batch_size", "2"]  # same tokens
RECIPE_EVAL = use_flags(load_config([RECIPE]).use)  # the recipe's use settings, for other rows' checkpoints


def variant(label: str, title: str, *flags: str) -> Row:
    """A row training the recipe with ``flags`` on top (its use section applied at eval, as the recipe's)."""
    return Row(label, f"the recipe, {title}", list(flags), config=RECIPE, data=MIX)


MLP = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# The long-context study (issue 27): the recipe against its variants, one change each. Their speed and state at 8K
# (which do not depend on the weights) come from benchmarks/generation.py with the same --attn settings.
RECIPE_VARIANTS = [
    variant("recipe_mse2", "2 softmax layers by transfer error", "--attention.softmax_pick", "mse",
            "--attention.softmax_count", "2"),
    variant("recipe_mse4", "4 softmax layers by transfer error (the pick before 2026-12-06)",
            "--attention.softmax_pick", "mse"),
    variant("recipe_mse6", "6 softmax layers by transfer error", "--attention.softmax_pick", "mse",
            "--attention.softmax_count", "6"),
    variant("recipe_kl2", "2 softmax layers by the KL pick", "--attention.softmax_count", "2"),
    variant("recipe_kl6", "6 softmax layers by the KL pick", "--attention.softmax_count", "6"),
    variant("recipe_ret4", "4 softmax layers by the base's retrieval score", "--attention.softmax_pick", "retrieval"),
    Row("recipe_nosparse", "the recipe without its sparse cache and linear scale (eval time)", train=False,
        checkpoint_of="recipe", eval_flags=["--sparse-cache", "0", "--linear-scale", "1"]),
    variant("recipe_w256", "window 256", "--attention.window_size", "256"),
    variant("recipe_delta", "a gated delta-rule state in place of the hybrid's linear one (no sparse cache: window "
            "kinds only)", "--attention.kind", "gated_delta", "--use.sparse_cache", "0", "--use.sparse_sink", "0",
            "--use.linear_scale", "1"),
    variant("recipe_more", "LoRA rank 64 on attention and MLP in stage 2", "--finetune.lora_r", "64",
            "--finetune.lora_alpha", "128", "--finetune.lora_targets", MLP),
    variant("recipe_seq4k", "trained on 4,096-token sequences (same tokens per step)", *LONG),
    variant("recipe_rope", "feature maps after RoPE (the recipe of the first 2026-12-07 study)",
            "--attention.feature_rope", "true"),
    variant("recipe_seq4k_rope", "feature maps after RoPE, trained on 4,096-token sequences (the recipe of "
            "2026-12-06)", "--attention.feature_rope", "true", *LONG),
]
ROWS = [
    Row("base", "base SmolLM2-135M-Instruct (softmax)", train=False),
    Row("recipe", "the README's recipe: configs/smollm2-135m.yaml as it is (4 softmax layers by the KL pick; its use "
        "section applied at eval)",
        config=RECIPE, data=MIX),
    Row("default", "today's default: terraced 64 + linear, Hedgehog, CE LoRA"),
    Row("control", "softmax model + the same LoRA stage (no linearizing)",
        ["--attention.softmax_layers", ",".join(str(i) for i in range(30))]),
    Row("datamix", "Alpaca + Wikipedia + Gutenberg (same token count)", data=MIX),
    Row("kl", "LoRA loss: KL to the teacher's logits", ["--finetune.loss", "kl"]),
    Row("mix", "LoRA loss: CE + KL mix (0.5)", ["--finetune.loss", "mix", "--finetune.kl_weight", "0.5"]),
    Row("sm2", "2 softmax layers (largest transfer error)", ["--attention.softmax_count", "2"]),
    Row("sm4", "4 softmax layers (largest transfer error)", ["--attention.softmax_count", "4"]),
    Row("w128", "window 128", ["--attention.window_size", "128"]),
    Row("sparse", "default + sparse cache 64 per head (eval time)", train=False, checkpoint_of="default",
        eval_flags=["--sparse-cache", "64"]),
    Row("gate", "forget gate on the linear part", ["--attention.gate", "pooled_keys"]),
    Row("combo", "datamix + mix loss + 4 softmax layers", ["--finetune.loss", "mix", "--attention.softmax_count", "4"],
        data=MIX),
    Row("combo_sparse", "combo + sparse cache 64 (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--sparse-cache", "64"]),
    Row("sm4r", "4 softmax layers (the base model's retrieval heads)",
        ["--attention.softmax_count", "4", "--attention.softmax_pick", "retrieval"]),
    Row("combo_r", "combo, its 4 softmax layers picked by retrieval score",
        ["--finetune.loss", "mix", "--attention.softmax_count", "4", "--attention.softmax_pick", "retrieval"],
        data=MIX),
    Row("combo_r_sparse", "combo_r + sparse cache 64 (eval time)", train=False, checkpoint_of="combo_r",
        eval_flags=["--sparse-cache", "64"]),
    Row("combo_r8", "combo, 8 softmax layers picked by retrieval score",
        ["--finetune.loss", "mix", "--attention.softmax_count", "8", "--attention.softmax_pick", "retrieval"],
        data=MIX),
    Row("combo_r8_sparse", "combo_r8 + sparse cache 64 (eval time)", train=False, checkpoint_of="combo_r8",
        eval_flags=["--sparse-cache", "64"]),
    Row("combo_r_sparse256", "combo_r + sparse cache 256 (eval time)", train=False, checkpoint_of="combo_r",
        eval_flags=["--sparse-cache", "256"]),
    Row("combo_sparse256", "combo + sparse cache 256 (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--sparse-cache", "256"]),
    Row("combo_sink", "combo + sparse cache 96 with a 32-token sink (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--sparse-cache", "96", "--sparse-sink", "32"]),
    Row("combo_sink64", "combo + sparse cache 128 with a 64-token sink (eval time)", train=False,
        checkpoint_of="combo", eval_flags=["--sparse-cache", "128", "--sparse-sink", "64"]),
    Row("combo_ls03", "combo, linear terms x 0.3 (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--linear-scale", "0.3"]),
    Row("combo_sink64_ls03", "combo_sink64, linear terms x 0.3 (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--sparse-cache", "128", "--sparse-sink", "64", "--linear-scale", "0.3"]),
    Row("combo_sink64_ls05", "combo_sink64, linear terms x 0.5 (eval time)", train=False, checkpoint_of="combo",
        eval_flags=["--sparse-cache", "128", "--sparse-sink", "64", "--linear-scale", "0.5"]),
    Row("combo_sink256_ls03_trained", "combo trained (both stages) with sparse cache 256, sink 64, linear terms x 0.3",
        ["--finetune.loss", "mix", "--attention.softmax_count", "4", "--attention.sparse_cache", "256",
         "--attention.sparse_sink", "64", "--attention.linear_scale", "0.3"], data=MIX),
    Row("combo_sink256_ls03", "combo + sparse cache 256 with a 64-token sink, linear terms x 0.3 (eval time)",
        train=False, checkpoint_of="combo",
        eval_flags=RECIPE_EVAL),
    Row("combo_long", "combo on packed 4096-token sequences (the same tokens, 2 x 4096 per step)",
        ["--finetune.loss", "mix", "--attention.softmax_count", "4", *LONG], data=MIX),
    Row("combo_long_sparse", "combo_long + sparse cache 64 (eval time)", train=False, checkpoint_of="combo_long",
        eval_flags=["--sparse-cache", "64"]),
    Row("combo_long_sink256_ls03", "combo_long + sparse cache 256, sink 64, linear terms x 0.3 (eval time)",
        train=False, checkpoint_of="combo_long",
        eval_flags=RECIPE_EVAL),
    Row("combo_long_sink256_ls015", "combo_long + sparse cache 256, sink 64, linear terms x 0.15 (eval time)",
        train=False, checkpoint_of="combo_long",
        eval_flags=["--sparse-cache", "256", "--sparse-sink", "64", "--linear-scale", "0.15"]),
    Row("combo_long_kl", "combo_long with the LoRA stage on KL to the teacher alone (closer to the base model)",
        ["--finetune.loss", "kl", "--attention.softmax_count", "4", *LONG], data=MIX),
    Row("combo_long_kl_sink256_ls03", "combo_long_kl + sparse cache 256, sink 64, linear terms x 0.3 (eval time)",
        train=False, checkpoint_of="combo_long_kl",
        eval_flags=RECIPE_EVAL),
    Row("combo0_long", "combo_long with no softmax layers: a decode state constant in the length",
        ["--finetune.loss", "mix", *LONG], data=MIX),
    Row("combo0_long_sink256_ls03", "combo0_long + sparse cache 256, sink 64, linear terms x 0.3 (eval time)",
        train=False, checkpoint_of="combo0_long",
        eval_flags=RECIPE_EVAL),
    *RECIPE_VARIANTS,
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model (a .gguf path, or a built-in name)")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "train"))
    p.add_argument("--eval-data", default=str(REPO.parent / "shared" / "data"), help="holds lm_eval_local/")
    p.add_argument("--ppl", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"))
    p.add_argument("--rows", default=",".join(r.label for r in ROWS))
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--tokens", type=int, default=3_600_000,
                   help="tokens of training text per row (train + validation): data.max_file_tokens of one file, or "
                        "this divided by the number of files (the same token count for a mix)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--recall-lengths", default="1024,2048,4096,8192")
    p.add_argument("--recall-tasks", default="niah_single,niah_multikey,passkey")
    p.add_argument("--recall-samples", type=int, default=50)
    p.add_argument("--recall-haystack", default=str(REPO.parent / "shared" / "data" / "wikitext-2" /
                                                    "wiki.test.tokens"),
                   help="natural text the niah tasks hide their needles in")
    p.add_argument("--recall-lead-in", action=argparse.BooleanOptionalAction, default=True,
                   help="answer lead-in on every recall task (passkey too)")
    p.add_argument("--tasks", default=ZERO_SHOT,
                   help="LM-Eval-Harness tasks of each row's evaluation (default: PIQA, ARC-E, ARC-C; '': none, for a "
                        "run that asks only the perplexity and recall questions)")
    p.add_argument("--mmlu-limit", type=int, default=5, help="MMLU 5-shot questions per subject (0: no MMLU)")
    p.add_argument("--seed", type=int, default=0, help="every row's linearize --seed")
    p.add_argument("--task-limit", type=int, default=None,
                   help="PIQA / ARC documents per task (default: the full sets; smaller for a smoke run)")
    p.add_argument("--batch-size", type=int, default=32, help="lolcats eval --batch-size")
    p.add_argument("--extra", default="", help="flags added to every linearize (quoted)")
    p.add_argument("--eval-extra", default="", help="flags added to every eval (quoted)")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    p.add_argument("--train-only", action="store_true",
                   help="train the rows and stop (a later run on the same --out evaluates them without training)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- commands


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lolcats.cli", *args]


def train_command(row: Row, a) -> list[str]:
    files = [str(Path(a.data) / f) for f in (row.data or [ALPACA])]
    if row.config is not None:  # the config's own token budget and batches: only where things are is given
        return cli("linearize", "--config", str(row.config), "--seed", str(a.seed), "--model.name", a.model,
                   "--data.train", ",".join(files),
                   "--run.output_dir", str(Path(a.out) / "runs" / row.label), "--run.progress", "false",
                   *row.flags, *shlex.split(a.extra))
    return cli("linearize", "--config", str(REPO / "configs" / "study-smollm2-135m.yaml"), "--seed", str(a.seed),
               "--model.name", a.model,
               "--data.train", ",".join(files), "--data.max_file_tokens", str(a.tokens // len(files)),
               "--run.output_dir", str(Path(a.out) / "runs" / row.label), "--run.progress", "false",
               "--distill.epochs", str(a.epochs), "--finetune.epochs", str(a.epochs),
               "--distill.micro_batch_size", "8", "--distill.grad_accum", "1",
               "--finetune.micro_batch_size", "8", "--finetune.grad_accum", "1",
               *row.flags, *shlex.split(a.extra))


def model_flags(row: Row, a, rows: dict[str, Row]) -> list[str]:
    if not row.train and row.checkpoint_of is None:
        return ["--base", a.model]
    return ["--checkpoint", str(stage2_dir(rows[row.checkpoint_of or row.label], a)), *row.eval_flags]


def run_report(row: Row, a) -> Path:
    """The report.json `lolcats linearize` wrote for ``row`` (runs/<label>/<run name>/report.json)."""
    found = sorted((Path(a.out) / "runs" / row.label).glob("*/report.json"))
    if not found:
        raise FileNotFoundError(f"row {row.label}: no report.json under {Path(a.out) / 'runs' / row.label}")
    return found[0]


def stage2_dir(row: Row, a) -> Path:
    return Path(json.loads(run_report(row, a).read_text())["run_dirs"][1]) / "best"


def eval_commands(row: Row, a, rows: dict[str, Row]) -> list[tuple[str, list[str]]]:
    include = str(Path(a.eval_data) / "lm_eval_local")
    common = ["--include-path", include, "--batch-size", str(a.batch_size), *shlex.split(a.eval_extra)]
    out = Path(a.out) / row.label
    tasks = ["--tasks", a.tasks] if a.tasks else []  # '': perplexity and recall only
    zero = cli("eval", *model_flags(row, a, rows), "--ppl", a.ppl,
               *tasks, "--recall", a.recall_tasks, "--recall-lengths", a.recall_lengths,
               "--recall-samples", str(a.recall_samples), "--recall-haystack", a.recall_haystack,
               "--recall-lead-in" if a.recall_lead_in else "--no-recall-lead-in", "--output", str(out / "eval.json"),
               *common,
               *(["--limit", str(a.task_limit)] if a.task_limit else []))
    mmlu = cli("eval", *model_flags(row, a, rows), "--tasks", "mmlu_local", "--num-fewshot", "5",
               "--limit", str(a.mmlu_limit), "--output", str(out / "mmlu.json"), *common)
    return [("eval", zero), ("mmlu", mmlu)] if a.mmlu_limit > 0 else [("eval", zero)]


def run_logged(name: str, cmd: list[str], folder: Path) -> float:
    """Run ``cmd`` with its output in folder/name.log; the command line in folder/commands.txt; seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "commands.txt", "a") as f:
        f.write(shlex.join(cmd) + "\n")
    t = time.time()
    with open(folder / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy(), check=False)
    if proc.returncode:
        raise RuntimeError(f"{name} exited {proc.returncode}; see {folder / (name + '.log')}")
    return time.time() - t


def run_row(row: Row, a, rows: dict[str, Row]) -> dict:
    """Train and evaluate ``row``; a step whose output is already there (a study run again on the same
    ``--out``, after a cut) is not run again, and its seconds come from the row's saved record."""
    folder = Path(a.out) / row.label
    saved = folder / "row.json"
    rec: dict = {"label": row.label, "title": row.title}
    if saved.is_file():
        rec.update({k: v for k, v in json.loads(saved.read_text()).items() if k.endswith("_seconds")})
    try:
        if row.train and not _has_report(row, a):
            _run_step(rec, "train", train_command(row, a), folder)
        for name, cmd in [] if a.train_only else eval_commands(row, a, rows):  # after training: they name its checkpoint
            if not (folder / f"{name}.json").is_file():
                _run_step(rec, name, cmd, folder)
    except Exception as e:  # noqa: BLE001 - one row's failure must not stop the others
        rec["error"] = str(e)
    return rec


def _run_step(rec: dict, name: str, cmd: list[str], folder: Path) -> None:
    rec[f"{name}_seconds"] = run_logged(name, cmd, folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "row.json").write_text(json.dumps(rec, indent=2))


def _has_report(row: Row, a) -> bool:
    return bool(list((Path(a.out) / "runs" / row.label).glob("*/report.json")))


# ---------------------------------------------------------------- the table


def _metric(results: dict, task: str, key: str = "acc"):
    for label in ("linearized", "base"):
        if task in results.get(label, {}):
            return results[label][task].get(key)
    return None


def row_summary(row: Row, a, rec: dict) -> dict:
    folder = Path(a.out) / row.label
    s = dict(rec)
    if (folder / "eval.json").is_file():
        r = json.loads((folder / "eval.json").read_text())["results"]
        s["wikitext_ppl"] = _metric(r, "ppl:wiki.test.tokens", "ppl")
        for t in ZERO_SHOT.split(","):
            s[t] = _metric(r, t, "acc_norm")
        for task in a.recall_tasks.split(","):
            for n in a.recall_lengths.split(","):
                s[f"{task}@{n}"] = _metric(r, f"{task}@{n}")
    if (folder / "mmlu.json").is_file():
        s["mmlu"] = _metric(json.loads((folder / "mmlu.json").read_text())["results"], "mmlu_local")
    runs = sorted((Path(a.out) / "runs" / row.label).glob("*/report.json"))
    if runs:
        rep = json.loads(runs[0].read_text())
        for k in ("stage1", "stage2"):
            s[f"{k}_tokens"], s[f"{k}_seconds"] = rep[k].get("tokens"), rep[k].get("seconds")
    return s


def _cell(v, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def table(summaries: list[dict], a) -> str:
    lengths = a.recall_lengths.split(",")
    head = (["row", "WikiText-2 ppl", "PIQA", "ARC-E", "ARC-C", "mean", f"MMLU 5-shot ({a.mmlu_limit}/subject)"]
            + [f"{t} {n}" for t in a.recall_tasks.split(",") for n in lengths]
            + ["stage 1 tokens, s", "stage 2 tokens, s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        zs = [s.get(t) for t in ZERO_SHOT.split(",")]
        mean = sum(zs) / 3 if all(v is not None for v in zs) else None
        stages = [f"{s[k + '_tokens']:,}, {s[k + '_seconds']:.0f}" if s.get(k + "_tokens") else "-"
                  for k in ("stage1", "stage2")]
        cells = ([s["title"] + (f" (error: {s['error']})" if "error" in s else ""), _cell(s.get("wikitext_ppl"), 1, 2)]
                 + [_cell(v, 100) for v in zs] + [_cell(mean, 100), _cell(s.get("mmlu"), 100)]
                 + [_cell(s.get(f"{t}@{n}"), 100, 0) for t in a.recall_tasks.split(",") for n in lengths] + stages)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(done: dict[str, dict], order: list[Row], a) -> None:
    summaries = [row_summary(r, a, done[r.label]) for r in order if r.label in done]
    Path(a.out, "study.json").write_text(json.dumps(summaries, indent=2))
    Path(a.out, "study.md").write_text(table(summaries, a) + "\n")


# ---------------------------------------------------------------- scheduling


def check_eval_inputs(a) -> None:
    """Stop before any row trains when its evaluations could not read their inputs: the perplexity and haystack
    files, and every data file the task folder names, resolved as the evaluations will (from the repository)."""
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # the evaluations run from here (run_logged): relative paths are read from here too
        for flag, path in (("--ppl", a.ppl), ("--recall-haystack", a.recall_haystack)):
            if not Path(path).is_file():
                raise SystemExit(f"study: {flag} {path} is not a file")
        with localized_include_path(Path(a.eval_data) / "lm_eval_local"):
            pass
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"study: --eval-data {a.eval_data}: {e}") from None
    finally:
        os.chdir(cwd)


def main(argv=None) -> None:
    a = parse_args(argv)
    rows = {r.label: r for r in ROWS}
    unknown = [x for x in a.rows.split(",") if x not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(rows)}")
    order = [rows[x] for x in a.rows.split(",")]
    if a.list:
        for r in order:
            if r.train:
                print(shlex.join(train_command(r, a)))
            if r.train:
                what = "its checkpoint"
            elif r.checkpoint_of:
                what = f"{r.checkpoint_of}'s checkpoint (once trained) {' '.join(r.eval_flags)}".rstrip()
            else:
                what = " ".join(model_flags(r, a, rows))
            print(f"# then lolcats eval ({r.label}): {what}")
        return
    if a.train_only:
        order = [r for r in order if r.train]
    else:
        check_eval_inputs(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    pending = list(order)
    with ThreadPoolExecutor(a.jobs) as pool:
        running: dict = {}
        while pending or running:
            for r in [r for r in pending if r.checkpoint_of is None or r.checkpoint_of in done
                      or _has_report(rows[r.checkpoint_of], a)]:  # trained by an earlier run on this --out
                if len(running) >= a.jobs:
                    break
                pending.remove(r)
                running[pool.submit(run_row, r, a, rows)] = r
            if not running:  # what is left waits for a row that failed or was not asked for
                for r in pending:
                    done[r.label] = {"label": r.label, "title": r.title, "error": f"needs row {r.checkpoint_of}"}
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                r = running.pop(fut)
                done[r.label] = fut.result()
                print(f"[study] {r.label}: {json.dumps(done[r.label])}", flush=True)
                write_tables(done, order, a)
    print(Path(a.out, "study.md").read_text())


if __name__ == "__main__":
    main()
