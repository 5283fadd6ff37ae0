"""The ``lolcats`` command line: every subcommand, its flags, and the typed call behind it.

    lolcats linearize [--config FILE] [--section.key VALUE ...]   both stages
    lolcats distill   [...]                                       stage 1: attention transfer
    lolcats finetune  [...]                                       stage 2: LoRA (after stage 1)
    lolcats export OUT  MODEL                                     a from_pretrained directory
    lolcats generate | chat | eval  MODEL ...                     use a trained model
    lolcats serve MODEL [--port N ...]                            an OpenAI-compatible HTTP server
    lolcats plan [--config FILE] --shape NAME --gpus N            memory and disk, before a run
    lolcats config                                                every config flag

MODEL is the same on every command that uses a model: ``--checkpoint DIR`` (a stage-1 or
stage-2 checkpoint, ``.../best``; a stage 2 finds its stage 1), ``--export DIR``, ``--base NAME``
(alone: the base model; with a checkpoint: the base to load it onto), or ``--config FILE`` and
config flags naming a finished run. Every config field is a flag (``--distill.lr 3e-3``).

A mistake in the input (a flag, a value, a file, a checkpoint, a full disk, a run directory in
use) ends with one line naming it and exit code 2; ``--debug`` (or ``LOLCATS_DEBUG=1``) shows
the traceback instead.

``--sparse-cache N`` puts LoLA's sparse cache on the loaded model (a checkpoint needs no retraining).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from lolcats.config import ConfigError, UseSettings, check_device, config_help, field_docs, load_config, use_flag
from lolcats.runs import RunInUseError

DTYPES = ("auto", "float32", "bfloat16", "float16")
USER_ERRORS = (ValueError, OSError, ImportError, RunInUseError)  # their messages say what to do: no traceback


class UsageError(Exception):
    """A command line argparse cannot parse (one line instead of argparse's usage text)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------- shared flags


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append",
                   help="YAML config file (see configs/); repeat to combine, later files win")


def _model_flags(p: argparse.ArgumentParser, base_alone: bool = True) -> None:
    g = p.add_argument_group("model (one of --checkpoint, --export, --config; or --base alone)")
    g.add_argument("--checkpoint", "--stage2", dest="checkpoint", metavar="DIR",
                   help="a stage checkpoint directory (.../best); a stage-2 one finds its stage 1")
    g.add_argument("--stage1", metavar="DIR", help="the stage-1 checkpoint (default: the one a stage 2 records)")
    g.add_argument("--export", metavar="DIR", help="a directory written by `lolcats export`")
    g.add_argument("--untrained", action="store_true",
                   help="the base model --config / config flags name, converted with untrained feature maps "
                        "(benchmarks: speed does not depend on the maps)")
    g.add_argument("--base", metavar="NAME",
                   help="base model (hub name, directory, .gguf, built-in): the checkpoint's recorded one by default"
                        + ("; alone: evaluate or use the base model itself" if base_alone else ""))
    _config_flags(g)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own Python code (a checkpoint's metadata never turns this on)")
    g.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights dtype: auto = bfloat16 on GPU, float32 on CPU (export: the dtype written; "
                        "auto = float32)")
    _use_flags(p)


def _use_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of UseSettings (``sparse_cache`` -> ``--sparse-cache``), help from its docstring."""
    g = p.add_argument_group("use (a linearized model's settings at load time; no training)",
                             "Each replaces the one its run recorded (the config's use section), a --sparse-cache "
                             "the recorded cache, score and sink together; not given: the recorded one, else as "
                             "trained.")
    docs = field_docs(UseSettings)
    for f in dataclasses.fields(UseSettings):
        tp = next(t for t in typing.get_args(typing.get_type_hints(UseSettings)[f.name]) if t is not type(None))
        kw = {"choices": typing.get_args(tp)} if typing.get_origin(tp) is typing.Literal else {
            "type": tp, "metavar": "N" if tp is int else "X"}
        g.add_argument(use_flag(f.name), dest=f.name, default=None, help=docs[f.name], **kw)


def _device(text: str) -> str:
    try:
        return check_device(text, "")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (a whole number from 0 to 65535)")
    return int(text)


def model_source(args: argparse.Namespace, rest: list[str]):
    """The :class:`~lolcats.models.trained.ModelSource` the model flags name; config flags only with a config."""
    from lolcats.models.trained import ModelSource

    explicit = args.checkpoint or args.export or args.stage1 or args.base
    if explicit and (rest or args.config):
        load_config(None, rest)  # an unknown flag is named as such
        flags = " ".join(rest) or "--config"
        raise ConfigError(f"{flags}: config flags name a run, and cannot be combined with --checkpoint, --export, "
                          "--stage1 or --base (use --base NAME to load a checkpoint onto another base model)")
    config = None if explicit else load_config(args.config, rest)
    use = UseSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(UseSettings)})
    return ModelSource(checkpoint=args.checkpoint, stage1=args.stage1, export=args.export, base=args.base,
                       config=config, untrained=args.untrained, trust_remote_code=args.trust_remote_code, use=use)


def _load(args, source):
    from lolcats.models.trained import load_trained

    return load_trained(source, None if args.device == "auto" else args.device, args.dtype)


# ---------------------------------------------------------------- training


def cmd_linearize(args, rest) -> None:
    from lolcats.evaluation.report import format_report
    from lolcats.pipeline import linearize

    print(format_report(linearize(load_config(args.config, rest))))


def cmd_distill(args, rest) -> None:
    from lolcats.pipeline import lock_run, prepare, run_distill, stage_dirs, stage_done, student_perplexity

    cfg = load_config(args.config, rest)
    d1 = stage_dirs(cfg)[0]
    done_before = stage_done(d1)
    with lock_run(cfg, ("distill",)):
        ctx = prepare(cfg)
        run_distill(ctx)
    if not stage_done(d1):  # block-wise with some blocks left (LOLCATS_BLOCKS)
        print(json.dumps({"stage1": str(d1), "finished": False}, indent=2))
        return
    print(json.dumps({"checkpoint": str(d1 / "best"), "skipped": done_before,
                      "val_lm_loss": student_perplexity(ctx)}, indent=2))


def cmd_finetune(args, rest) -> None:
    from lolcats.pipeline import lock_run, prepare, run_distill, run_finetune, stage_dirs, student_perplexity

    cfg = load_config(args.config, rest)
    with lock_run(cfg):
        ctx = prepare(cfg)
        run_distill(ctx)  # loads the finished stage 1 (runs it if missing)
        model, result = run_finetune(ctx)
    print(json.dumps({"checkpoint": str(stage_dirs(cfg)[1] / "best"), "skipped": result is None,
                      "val_lm_loss": student_perplexity(ctx, model)}, indent=2))


# ---------------------------------------------------------------- using a model


def cmd_export(args, rest) -> None:
    from lolcats.hf import check_export_dir, export_model
    from lolcats.models.trained import load_trained
    from lolcats.runtime import DTYPES as DTYPE_OF

    source = model_source(args, rest)
    if not source.linearized or source.export:
        raise ConfigError("export: give the trained model with --checkpoint DIR or --config FILE")
    check_export_dir(args.out)  # before the model loads
    model, tok = load_trained(source, device="cpu", dtype="float32", merge=True)
    out = export_model(model, tok, args.out, dtype=None if args.dtype == "auto" else DTYPE_OF[args.dtype])
    print(f"exported to {out}; load with AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True) "
          "(or, with lolcats installed, `import lolcats.hf` and leave out trust_remote_code)")


def read_prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
    """--prompt values, then the lines of --prompt-file, else stdin when it is not a terminal."""
    out = list(prompts)
    if prompt_file:
        with open(prompt_file) as f:
            out += [line.rstrip("\n") for line in f if line.strip()]
    if not out and not sys.stdin.isatty():
        out = [sys.stdin.read()]
    if not out:
        raise ValueError("generate: give --prompt TEXT (repeatable), --prompt-file FILE, or text on stdin")
    return out


def cmd_generate(args, rest) -> None:
    from lolcats.generation.text import check_prompts, complete

    if args.compile and not args.fast:
        raise ValueError("--compile needs --fast (it compiles FastGenerator's decode step)")
    source = model_source(args, rest)
    prompts = check_prompts(read_prompts(args.prompt, args.prompt_file))
    model, tok = _load(args, source)
    texts = complete(model, tok, prompts, args.chat_template, args.max_new_tokens, args.temperature, args.top_p,
                     args.stop, args.stream, args.fast, args.compile)
    if not args.stream:
        for i, t in enumerate(texts):
            print(f"=== {i}\n{t}" if len(texts) > 1 else t)


def cmd_chat(args, rest) -> None:
    from lolcats.generation.text import run_chat

    model, tok = _load(args, model_source(args, rest))
    run_chat(model, tok, args.max_new_tokens, args.temperature, args.top_p, args.system)


def cmd_eval(args, rest) -> None:
    from lolcats.evaluation import EvalSettings, eval_main
    from lolcats.evaluation.recall import recall_settings

    recall = recall_settings(args.recall, args.recall_lengths, args.recall_depths, samples=args.recall_samples,
                             keys=args.recall_keys, seed=args.recall_seed, batch_size=args.recall_batch_size,
                             chat_template=args.recall_chat_template, max_new_tokens=args.recall_max_new_tokens,
                             haystack=args.recall_haystack, values=args.recall_values,
                             value_count=args.recall_value_count, lead_in=args.recall_lead_in)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)
             if f.name not in ("recall", "print_table")}  # a flag per field (--ppl-mode: ppl_mode)
    eval_main(model_source(args, rest), EvalSettings(**flags, recall=recall))


def cmd_serve(args, rest) -> None:
    import dataclasses

    from lolcats.serving.options import ServeOptions
    from lolcats.serving.server import serve

    opts = ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})
    opts.check()
    model, tok = _load(args, model_source(args, rest))
    serve(model, tok, opts)


def cmd_config(args, rest) -> None:
    load_config(args.config, rest)  # a bad file or flag is an error here too
    print(config_help())


def cmd_plan(args, rest) -> None:
    from lolcats.plan import plan_main

    plan_main(load_config(args.config, rest), args.shape, args.gpus, args.tokens, args.gpu_memory)


# ---------------------------------------------------------------- parsers


def _limit(text: str) -> int | float:
    """``--limit 100`` (documents per task) or ``--limit 0.1`` (a fraction)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def _generate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--fast", action="store_true", help="static buffers + CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="with --fast: torch.compile the decode step before its capture (faster steps: SmolLM2 on an "
                        "H200 1.48 against 2.25 ms at batch 1; the first call compiles, ~40 s)")
    p.add_argument("--chat-template", action="store_true",
                   help="send each prompt as a user message through the tokenizer's chat template (instruct models)")


def _chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system", help="system prompt")


def _eval_flags(p: argparse.ArgumentParser) -> None:
    from lolcats.evaluation.perplexity import PPL_MODES

    p.add_argument("--compare-base", action="store_true",
                   help="also evaluate the base model (the recorded one, or --base), side by side")
    g = p.add_argument_group("perplexity")
    g.add_argument("--ppl", nargs="+", default=[], metavar="FILE", help="text or Alpaca-style files")
    g.add_argument("--ppl-mode", default="packed", choices=PPL_MODES,
                   help="packed: chunks of --seq-len as in training; document: each document alone")
    g.add_argument("--seq-len", type=int, default=1024, help="chunk length (packed) or window length (document)")
    g.add_argument("--ppl-stride", type=int, default=None,
                   help="document mode: new tokens per window for long documents (default seq-len - 1)")
    g.add_argument("--ppl-format", default="auto", choices=("auto", "alpaca", "text"))
    g.add_argument("--ppl-template", default="alpaca", choices=("alpaca", "chat", "none"))
    g.add_argument("--max-documents", type=int, default=None, help="score only the first N documents")
    g = p.add_argument_group("LM-Eval-Harness")
    g.add_argument("--tasks", default=None, help="comma-separated, e.g. piqa,arc_easy,arc_challenge,mmlu")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--limit", type=_limit, default=None,
                   help="documents per task, and windows per --ppl file (or a fraction < 1 of them)")
    g.add_argument("--include-path", default=None,
                   help="folder of local task YAMLs (run offline; 'piqa' picks 'piqa_local' there)")
    _recall_flags(p)
    p.add_argument("--output", default=None, help="write the results as JSON here")


def _recall_flags(p: argparse.ArgumentParser) -> None:
    from lolcats.evaluation.recall import RECALL_TASKS, VALUE_KINDS, RecallSettings

    d = RecallSettings()
    joined = lambda values: ",".join(f"{v:g}" for v in values)  # noqa: E731
    g = p.add_argument_group("long-context recall (lolcats.evaluation.recall)")
    g.add_argument("--recall", default=None, help=f"comma-separated recall tasks: {', '.join(RECALL_TASKS)}")
    g.add_argument("--recall-lengths", default=None,
                   help=f"prompt lengths in tokens, template and question included (default {joined(d.lengths)})")
    g.add_argument("--recall-depths", default=None, help="depths of the asked key in the filler, fractions in "
                   f"[0, 1], cycled over the samples, or 'random' (default {joined(d.depths)})")
    g.add_argument("--recall-samples", type=int, default=None, help=f"prompts per task and length ({d.samples})")
    g.add_argument("--recall-keys", type=int, default=None,
                   help=f"keys per multikey and niah_multikey prompt ({d.keys})")
    g.add_argument("--recall-haystack", default=None, metavar="FILE",
                   help="natural text the niah_* tasks hide their needles in, a contiguous span at a seeded offset "
                        "(.txt/.tokens, .json/.jsonl records, optionally .gz; e.g. WikiText or Wikipedia)")
    g.add_argument("--recall-values", default=None, choices=tuple(VALUE_KINDS),
                   help=f"what the niah_* needles hide: 7-digit numbers or 'adjective noun' words ({d.values})")
    g.add_argument("--recall-value-count", type=int, default=None,
                   help=f"values of the asked key in niah_multivalue, all asked ({d.value_count})")
    g.add_argument("--recall-lead-in", action=argparse.BooleanOptionalAction, default=None,
                   help="end every prompt with an answer lead-in ('The special magic number for X mentioned in the "
                        "provided text is'; after the chat template's assistant header), or none; default: in "
                        "niah_* prompts, and in passkey / multikey prompts without a chat template")
    g.add_argument("--recall-seed", type=int, default=None, help=f"seed: same seed, same prompts ({d.seed})")
    g.add_argument("--recall-batch-size", type=int, default=None, help=f"prompts per generate call ({d.batch_size})")
    g.add_argument("--recall-max-new-tokens", type=int, default=None,
                   help="greedy tokens per answer (default: 16; niah: 16 + 16 per asked value)")
    g.add_argument("--no-recall-chat-template", dest="recall_chat_template", action="store_false",
                   help="plain prompts even if the tokenizer has a chat template")
    g.add_argument("--recall-depth-rows", action="store_true", help="per-depth accuracies as table rows too")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of ServeOptions (``max_batch`` -> ``--max-batch``), help from its docstring."""
    import dataclasses
    import typing

    from lolcats.config import field_docs
    from lolcats.serving.options import ServeOptions

    docs, hints, defaults = field_docs(ServeOptions), typing.get_type_hints(ServeOptions), ServeOptions()
    g = p.add_argument_group("server")
    for f in dataclasses.fields(ServeOptions):
        tp, default = hints[f.name], getattr(defaults, f.name)
        kw: dict = {"dest": f.name, "default": default, "help": f"{docs.get(f.name, '')} (default {default!r})"}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
        else:
            kw["type"] = _port if f.name == "port" else tp
        g.add_argument("--" + f.name.replace("_", "-"), **kw)


def _plan_flags(p: argparse.ArgumentParser) -> None:
    from lolcats.models.loading import known_shapes

    p.add_argument("--shape", default=None,
                   help="model config: a configs/shapes name (" + ", ".join(known_shapes())
                        + "), a config.json or a model directory; model.name when omitted")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the run (sharded or replicated as --run.parallel decides)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens whose hidden states block-wise transfer stores (train + val)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU to compare against")


COMMANDS = {  # name: (help, function, flag builders); config flags (--section.key) go to every command
    "linearize": ("attention transfer then LoRA (both stages)", cmd_linearize, (_config_flags,)),
    "distill": ("stage 1: attention transfer", cmd_distill, (_config_flags,)),
    "finetune": ("stage 2: LoRA adjusting", cmd_finetune, (_config_flags,)),
    "export": ("write a directory that AutoModelForCausalLM.from_pretrained loads", cmd_export,
               (lambda p: p.add_argument("out", help="output directory"), lambda p: _model_flags(p, False))),
    "generate": ("generate text with a linearized model (constant-size state)", cmd_generate,
                 (_model_flags, _generate_flags)),
    "chat": ("chat with a linearized model (streaming, chat template)", cmd_chat, (_model_flags, _chat_flags)),
    "serve": ("OpenAI-compatible HTTP server with continuous batching (constant-size states)", cmd_serve,
              (_model_flags, _serve_flags)),
    "eval": ("perplexity and LM-Eval-Harness tasks, base and linearized side by side", cmd_eval,
             (_model_flags, _eval_flags)),
    "plan": ("memory per GPU and disk each stage needs, before anything runs", cmd_plan, (_config_flags, _plan_flags)),
    "config": ("list every config flag", cmd_config, (_config_flags,)),
}

DEBUG_HELP = "show the traceback of an error (also LOLCATS_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lolcats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, fn, builders) in COMMANDS.items():
        desc = help + "\n\nConfig flags (any of):\n" + config_help()
        p = sub.add_parser(name, help=help, description=desc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        for build in builders:
            build(p)
        p.set_defaults(fn=fn)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 2 with a one-line message on a mistake in the input, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("LOLCATS_DEBUG", "") not in ("", "0")
    try:
        args, rest = build_parser().parse_known_args(argv)
        args.fn(args, rest)
    except KeyboardInterrupt:
        if debug:
            raise
        print("lolcats: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ConfigError) as e:
        if debug:
            raise
        print(f"lolcats: {'config ' if isinstance(e, ConfigError) else ''}error: {_one_line(e)}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"lolcats: error: {_one_line(e)} (--debug shows where)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
