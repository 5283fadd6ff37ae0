"""The ``lolcats`` command line.

    lolcats linearize [--config FILE] [--section.key VALUE ...]   both stages
    lolcats distill   [...]                                       stage 1: attention transfer
    lolcats finetune  [...]                                       stage 2: LoRA (after stage 1)
    lolcats export OUT [...] [--checkpoint STAGE_DIR]             a from_pretrained directory
    lolcats eval | generate | chat | plan ...                     see `lolcats CMD --help`

Every config field is a flag (``--distill.lr 3e-3``); ``lolcats config`` lists them.
"""

from __future__ import annotations

import argparse
import json
import sys

from lolcats.config import ConfigError, config_help, load_config


def _config_parser(name: str, help: str, sub) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help + "\n\nConfig flags (any of):\n" + config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append",
                   help="YAML config file (see configs/); repeat to combine, later files win")
    return p


def _load(args, rest):
    return load_config(args.config, rest)


def cmd_linearize(args, rest) -> None:
    from lolcats.pipeline import format_report, linearize

    cfg = _load(args, rest)
    report = linearize(cfg)
    print(format_report(report))


def cmd_distill(args, rest) -> None:
    from lolcats.pipeline import prepare, run_distill, stage_dirs, stage_done, student_perplexity

    cfg = _load(args, rest)
    ctx = prepare(cfg)
    d1 = stage_dirs(cfg)[0]
    done_before = stage_done(d1)
    run_distill(ctx)
    if not stage_done(d1):  # block-wise with some blocks left (LOLCATS_BLOCKS)
        print(json.dumps({"stage1": str(d1), "finished": False}, indent=2))
        return
    print(json.dumps({"checkpoint": str(d1 / "best"), "skipped": done_before,
                      "val_lm_loss": student_perplexity(ctx)}, indent=2))


def cmd_finetune(args, rest) -> None:
    from lolcats.pipeline import prepare, run_distill, run_finetune, stage_dirs, student_perplexity

    cfg = _load(args, rest)
    ctx = prepare(cfg)
    run_distill(ctx)  # loads the finished stage 1 (runs it if missing)
    model, result = run_finetune(ctx)
    print(json.dumps({"checkpoint": str(stage_dirs(cfg)[1] / "best"), "skipped": result is None,
                      "val_lm_loss": student_perplexity(ctx, model)}, indent=2))


def cmd_export(args, rest) -> None:
    import torch

    from lolcats.checkpoint import read_meta
    from lolcats.hf import export_model
    from lolcats.pipeline import load_linearized, stage_dirs, stage_done

    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        s1, s2 = (args.checkpoint, None) if meta["stage"] == "distill" else (None, args.checkpoint)
    else:
        cfg = _load(args, rest)
        d1, d2 = stage_dirs(cfg)
        if not stage_done(d1):
            raise SystemExit(f"no finished stage 1 for this config at {d1}; run `lolcats linearize` first")
        s1, s2 = str(d1 / "best"), (str(d2 / "best") if stage_done(d2) else None)
    model, tok = load_linearized(None, s1, s2, device="cpu", dtype="float32", merge=True)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    out = export_model(model, tok, args.out, dtype=dtype)
    print(f"exported to {out}; load with AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True) "
          "(or, with lolcats installed, `import lolcats.hf` and leave out trust_remote_code)")


def _add_subcommands(sub) -> None:
    for name, fn, help in (("linearize", cmd_linearize, "attention transfer then LoRA (both stages)"),
                           ("distill", cmd_distill, "stage 1: attention transfer"),
                           ("finetune", cmd_finetune, "stage 2: LoRA adjusting")):
        _config_parser(name, help, sub).set_defaults(fn=fn)
    p = _config_parser("export", "write a directory that AutoModelForCausalLM.from_pretrained loads", sub)
    p.add_argument("out", help="output directory")
    p.add_argument("--checkpoint", help="a stage checkpoint directory (.../best) instead of --config")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="float type of the written weights; auto: as loaded for the export (float32, on CPU)")
    p.set_defaults(fn=cmd_export)
    sub.add_parser("config", help="list every config flag").set_defaults(fn=lambda a, r: print(config_help()))
    _add_optional_subcommands(sub)


def _add_optional_subcommands(sub) -> None:
    """Commands whose code lives in optional modules (eval, generation, planning)."""
    from lolcats import commands

    commands.add_all(sub, _config_parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lolcats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_subcommands(sub)
    args, rest = parser.parse_known_args(argv)
    try:
        args.fn(args, rest)
    except ConfigError as e:
        print(f"lolcats: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"lolcats: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
