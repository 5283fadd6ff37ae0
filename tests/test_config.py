"""The config schema: YAML, flags, validation, shipped configs."""

from pathlib import Path

import pytest

from lolcats.cli import main
from lolcats.config import Config, ConfigError, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_defaults_are_the_paper_recipe():
    c = Config()
    assert (c.attention.feature_map, c.attention.kind, c.attention.window_size) == ("hedgehog", "terraced_window", 64)
    assert (c.distill.lr, c.distill.epochs, c.distill.grad_accum, c.distill.mse_factor) == (1e-2, 2, 8, 1000.0)
    assert (c.finetune.lr, c.finetune.lora_r, c.finetune.lora_alpha) == (1e-4, 8, 16.0)
    assert c.finetune.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_flags_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("distill: {lr: 0.5}\nattention: {kind: linear}\n")
    c = load_config(f, ["--distill.lr", "3e-3", "--seed=7", "--finetune.lora_targets", "q_proj,v_proj"])
    assert c.distill.lr == 3e-3 and c.run.seed == 7 and c.attention.kind == "linear"
    assert c.finetune.lora_targets == ["q_proj", "v_proj"]


def test_include_composes_files(tmp_path):
    (tmp_path / "a.yaml").write_text("distill: {lr: 0.5, epochs: 3}\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\ndistill: {lr: 0.25}\n")
    c = load_config(tmp_path / "b.yaml")
    assert (c.distill.lr, c.distill.epochs) == (0.25, 3)


@pytest.mark.parametrize("over, match", [
    (["--distill.lrr", "1"], r"unknown config key distill\.lrr; known keys of distill: .*lr"),
    (["--attention.kind", "cosine"], r"attention\.kind: 'cosine' is not one of 'linear', 'sliding_window'"),
    (["--distill.epochs", "two"], r"distill\.epochs: 'two' is not int"),
    (["--data.seq_len", "0"], r"data\.seq_len: 0 must be > 0"),
    (["--nosection", "1"], r"unknown flag"),
    (["--attention.init_window_factor", "1.5"], r"init_window_factor"),
])
def test_bad_keys_and_values_are_named(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, over)


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("modle: {name: x}\n")
    with pytest.raises(ConfigError, match="unknown config key modle; known keys: attention, data"):
        load_config(f)


def test_cli_reports_config_errors_at_startup(capsys):
    assert main(["linearize", "--distill.bogus", "1"]) == 2
    assert "unknown config key distill.bogus" in capsys.readouterr().err


def test_fingerprint_depends_on_sections():
    a, b = Config(), Config()
    b.finetune.lr = 1.0
    assert a.fingerprint("distill") == b.fingerprint("distill")
    assert a.fingerprint("finetune") != b.fingerprint("finetune")


def test_parse_overrides_needs_value():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--distill.lr"])


def test_several_config_files_compose_in_order(capsys):
    """--config A --config B: B's keys win, A's others stay (a model config + an attention variant)."""
    repo = Path(__file__).resolve().parents[1]
    cfg = load_config([repo / "configs/smollm2-135m.yaml", repo / "configs/attention/t2r-linear.yaml"])
    assert cfg.data.template == "chat" and cfg.attention.kind == "linear" and cfg.attention.feature_map == "t2r"
    assert main(["config", "--config", str(repo / "configs/smollm2-135m.yaml"),
                 "--config", str(repo / "configs/attention/t2r-linear.yaml")]) in (0, None)
    assert "t2r" in capsys.readouterr().out


def _written_docs() -> dict[str, list[str]]:
    """{"section.key": every string statement written under the field in config.py}, read here independently
    of lolcats.config's own reader (a docstring may run over several string lines without parentheses)."""
    import ast
    import typing
    from dataclasses import fields

    import lolcats.config as config

    tree = ast.parse(Path(config.__file__).read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    out = {}
    for sec in fields(Config):
        cls = typing.get_type_hints(Config)[sec.name]
        body = [s for klass in reversed(cls.__mro__) if klass.__name__ in classes for s in classes[klass.__name__].body]
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign):
                strings = []
                for nxt in body[i + 1:]:
                    if not (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                        break
                    strings.append(nxt.value.value)
                out[f"{sec.name}.{stmt.target.id}"] = strings
    return out


def test_help_shows_each_field_whole(capsys):
    """`lolcats config` and every subcommand's --help print each config field's whole docstring: a docstring
    written over several string lines was cut after its first (issue 29: attention.gate, sparse_*, ...)."""
    written = _written_docs()
    assert len(written["attention.sparse_cache"]) > 1  # the case that was cut
    assert main(["config"]) == 0
    lines = {line.split()[0][2:]: line for line in capsys.readouterr().out.splitlines()}
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    eval_help = capsys.readouterr().out
    for key, strings in written.items():
        doc = "".join(strings)
        assert doc and doc.rstrip().endswith((".", ")")), key  # a docstring is a whole sentence
        assert f" {doc} [" in lines[key], key
        assert " ".join(doc.split()) in " ".join(eval_help.split()), key  # argparse keeps the text, not the spaces


def test_top_level_help_names_every_subcommand(capsys):
    from lolcats.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    usage_lines = [line for line in out.split("positional arguments")[0].splitlines() if "    lolcats " in line]
    for name in COMMANDS:
        assert any(f" {name} " in line.replace("|", " ") for line in usage_lines), name
