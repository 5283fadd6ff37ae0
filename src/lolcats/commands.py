"""Subcommands beyond the training pipeline: eval, generate, chat, serve, plan.

Each is added only if its module imports, so a missing optional dependency disables one
command instead of the whole CLI.
"""

from __future__ import annotations

import argparse

from lolcats.config import load_config


def load_trained(args, rest):
    """The linearized model a generate/chat call means: --export DIR, --checkpoint DIR, or the
    finished stages of the run that --config and the flags name."""
    from lolcats.checkpoint import read_meta
    from lolcats.pipeline import load_linearized, stage_dirs, stage_done

    if args.export:
        import lolcats.hf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.export)
        from lolcats.models.loading import resolve_device

        return model.to(resolve_device("auto")).eval(), AutoTokenizer.from_pretrained(args.export)
    if args.checkpoint:
        stage = read_meta(args.checkpoint)["stage"]
        s1, s2 = (args.checkpoint, None) if stage == "distill" else (None, args.checkpoint)
        return load_linearized(None, s1, s2)
    cfg = load_config(args.config, rest)
    d1, d2 = stage_dirs(cfg)
    if not stage_done(d1):
        raise ValueError(f"no trained model for this config (nothing at {d1}): run `lolcats linearize` "
                         "with the same flags, or pass --checkpoint DIR or --export DIR")
    return load_linearized(None, str(d1 / "best"), str(d2 / "best") if stage_done(d2) else None)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a stage checkpoint directory (.../best)")
    p.add_argument("--export", help="an exported model directory")


def _add_generation(sub, config_parser) -> None:
    try:
        from lolcats.generation.cli import chat_main, generate_main
    except ImportError:
        return
    p = config_parser("generate", "generate text with a linearized model (constant-size state)", sub)
    _model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--fast", action="store_true", help="static buffers + CUDA graphs")
    p.add_argument("--chat-template", action="store_true",
                   help="send each prompt as a user message through the tokenizer's chat template (instruct models)")
    p.set_defaults(fn=lambda a, rest: generate_main(None, a, *load_trained(a, rest)))

    p = config_parser("chat", "chat with a linearized model (streaming, chat template)", sub)
    _model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(fn=lambda a, rest: chat_main(None, a, *load_trained(a, rest)))


def _add_serve(sub, config_parser) -> None:
    try:
        from lolcats.serving.cli import add_serve_arguments, serve_main
    except ImportError:
        return
    p = config_parser("serve", "OpenAI-compatible HTTP server with continuous batching (constant-size states)", sub)
    _model_arguments(p)
    add_serve_arguments(p)
    p.set_defaults(fn=lambda a, rest: serve_main(a, *(_load_untrained(a, rest) if a.untrained
                                                      else load_trained(a, rest))))


def _load_untrained(args, rest):
    from lolcats.generation.cli import load_for_generation

    return load_for_generation(load_config(args.config, rest))


def _add_eval(sub) -> None:
    try:
        from lolcats.evaluation import add_eval_arguments, eval_from_args
    except ImportError:
        return
    p = sub.add_parser("eval", help="perplexity and LM-Eval-Harness tasks, base and linearized side by side")
    add_eval_arguments(p)
    p.set_defaults(fn=lambda a, rest: _no_rest(rest) or eval_from_args(a))


def _add_plan(sub, config_parser) -> None:
    try:
        from lolcats.plan import add_plan_arguments, plan_main
    except ImportError:
        return
    p = config_parser("plan", "memory per GPU and disk each stage needs, before anything runs", sub)
    add_plan_arguments(p)
    p.set_defaults(fn=lambda a, rest: plan_main(a, load_config(a.config, rest)))


def _no_rest(rest) -> None:
    if rest:
        raise ValueError(f"unexpected arguments: {' '.join(rest)}")


def add_all(sub, config_parser) -> None:
    _add_generation(sub, config_parser)
    _add_serve(sub, config_parser)
    _add_eval(sub)
    _add_plan(sub, config_parser)
