"""Subcommands beyond the training pipeline: eval, generate, chat, plan.

Each is added only if its module imports, so a missing optional dependency disables one
command instead of the whole CLI. (Filled in as those modules land.)"""

from __future__ import annotations


def add_all(sub, config_parser) -> None:
    pass
