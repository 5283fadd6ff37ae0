"""lolcats' own modules as transformers remote code, written beside an exported model.

An exported directory has to load where lolcats is not installed (``trust_remote_code=True``).
Instead of a second copy of the attention code, :func:`write_bundle` copies the package's modules
that the model classes need, the import closure of their module (read from the import statements),
into the directory as flat files (``lolcats.ops.hybrid.naive`` -> ``lolcats_ops_hybrid_naive.py``),
with three rewrites:

* ``from lolcats.x.y import a`` -> ``from .lolcats_x_y import a``: transformers copies the files a
  remote-code module imports relatively (it follows these lines, in try blocks too);
* a string that names a lolcats module (``import_module("lolcats.ops.triton_backend")``) -> that
  module in the bundle, ``(__package__ + ".lolcats_ops_triton_backend")``; the entry module lists
  such modules under ``if TYPE_CHECKING:`` so that transformers copies them as well;
* an import of an optional package (one that only modules imported under ``try`` or by name
  import, such as triton) goes into ``try: ... except ImportError: raise``. transformers' check
  of a remote module's requirements skips try blocks, so a machine without triton loads the
  model, and the kernels' ImportError reaches the ``except ImportError`` that lolcats has there.

Supported import forms: ``from lolcats.a.b import names`` and its relative equivalents;
``import lolcats.x`` and ``from lolcats.a import submodule`` stop the export, naming file and line.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import lolcats

PACKAGE = "lolcats"
OPTIONAL_NOTE = "optional package: transformers' requirement check skips try blocks"


class BundleError(ValueError):
    """lolcats source that the bundler cannot make relative."""


@dataclass
class Source:
    name: str  # lolcats.ops.hybrid.naive
    path: Path
    text: str
    tree: ast.Module
    refs: list[tuple[ast.AST, str, bool]] = field(default_factory=list)  # (node, module, guarded)


def flat_name(module: str) -> str:
    """The bundle's file stem for a lolcats module: lolcats.ops.hybrid.naive -> lolcats_ops_hybrid_naive."""
    return module.replace(".", "_")


def package_root() -> Path:
    return Path(lolcats.__file__).parent


def module_file(name: str) -> Path | None:
    """The source file of lolcats module ``name`` (a package's __init__.py), None if there is none."""
    parts = name.split(".")[1:]
    if not parts:
        return package_root() / "__init__.py"
    for path in (package_root().joinpath(*parts).with_suffix(".py"), package_root().joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def write_bundle(out_dir: str | Path, roots: tuple[str, ...], entry: str, entry_body: str) -> list[Path]:
    """Write the lolcats modules ``roots`` and all they import as flat modules into ``out_dir``,
    plus ``<entry>.py`` (a docstring, ``entry_body``, the by-name modules); returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = closure(roots)
    optional = optional_packages(sources, roots)
    written = []
    for src in sources.values():
        path = out_dir / f"{flat_name(src.name)}.py"
        path.write_text(rewrite(src, optional))
        written.append(path)
    by_name = sorted({m for s in sources.values() for node, m, _ in s.refs if isinstance(node, ast.Constant)})
    entry_path = out_dir / f"{entry}.py"
    entry_path.write_text(_entry_text(entry_body, by_name))
    _check_copied(entry_path, written)
    return [entry_path] + written


def _entry_text(body: str, by_name: list[str]) -> str:
    text = (f'"""Remote code of a model linearized with LoLCATs, written by lolcats {lolcats.__version__}.\n\n'
            "    AutoModelForCausalLM.from_pretrained(<this directory>, trust_remote_code=True)\n\n"
            "The lolcats_*.py files beside this one are lolcats' own modules with their imports made\n"
            'relative: loading needs torch and transformers, not lolcats.\n"""\n\n'
            "from typing import TYPE_CHECKING\n\n" + body)
    if by_name:
        text += "\nif TYPE_CHECKING:  # loaded by name at run time; listed so that transformers copies them\n"
        text += "".join(f"    from .{flat_name(m)} import *  # noqa: F401,F403\n" for m in by_name)
    return text


def _check_copied(entry: Path, files: list[Path]) -> None:
    """Every bundled file is one transformers will copy with the entry (its relative-import closure)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    reached = {Path(f).name for f in get_relative_import_files(entry)}
    missing = sorted(f.name for f in files if f.name not in reached)
    if missing:
        raise BundleError(f"the export's remote code does not reach {missing}: transformers would not copy them")


# ---------------------------------------------------------------- reading imports


def closure(roots: tuple[str, ...]) -> dict[str, Source]:
    """Every lolcats module that ``roots`` import (at any depth, lazily or by name), parsed."""
    sources: dict[str, Source] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        sources[name] = src = parse(name)
        todo.extend(m for _, m, _ in src.refs)
    flat = {}
    for name in sources:
        if flat.setdefault(flat_name(name), name) != name:
            raise BundleError(f"modules {flat[flat_name(name)]} and {name} would share the file {flat_name(name)}.py")
    return sources


def parse(name: str, text: str | None = None) -> Source:
    """Module ``name`` (its file's text, or ``text``) with its references to lolcats modules."""
    path = module_file(name)
    if path is None:
        raise BundleError(f"no source file for module {name}")
    text = path.read_text() if text is None else text
    src = Source(name, path, text, ast.parse(text, str(path)))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node, guarded in _walk(src.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    raise _unsupported(src, node, f"`import {alias.name}` binds the package; "
                                                  f"write `from {alias.name} import <names>`")
        elif isinstance(node, ast.ImportFrom):
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            if not _is_ours(target):
                continue
            for alias in node.names:
                if module_file(f"{target}.{alias.name}") is not None:
                    raise _unsupported(src, node, f"`{alias.name}` is a module; import names from "
                                                  f"{target}.{alias.name} instead")
            src.refs.append((node, target, guarded))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value != PACKAGE \
                and _is_ours(node.value) and module_file(node.value) is not None:
            src.refs.append((node, node.value, True))
    return src


def _is_ours(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _unsupported(src: Source, node: ast.AST, why: str) -> BundleError:
    return BundleError(f"{src.path}:{node.lineno}: cannot bundle this import for an export: {why}")


def _walk(tree: ast.Module):
    """(node, guarded) for every node that is not a docstring or part of an f-string; guarded:
    inside a ``try`` block."""
    stack = [(tree, False)]
    while stack:
        node, guarded = stack.pop()
        yield node, guarded
        if isinstance(node, ast.JoinedStr):
            continue
        body = getattr(node, "body", None)
        for child in ast.iter_child_nodes(node):
            is_doc = (isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant)
                      and isinstance(body, list) and child is body[0])
            if not is_doc:
                stack.append((child, guarded or isinstance(node, ast.Try)))


def optional_packages(sources: dict[str, Source], roots: tuple[str, ...]) -> set[str]:
    """Third-party packages that only optional modules import (those reached from ``roots``
    only through a ``try`` block or by name)."""
    required, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in required:
            required.add(name)
            todo.extend(m for _, m, guarded in sources[name].refs if not guarded)
    needed = {p for n in required for p, _ in _third_party(sources[n])}
    return {p for s in sources.values() for p, _ in _third_party(s)} - needed


def _third_party(src: Source):
    """(top-level package, import node) for the unguarded imports of non-lolcats, non-stdlib packages."""
    for node, guarded in _walk(src.tree):
        if guarded:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            if not _is_ours(top) and top not in sys.stdlib_module_names and top != "__future__":
                yield top, node


# ---------------------------------------------------------------- rewriting


def rewrite(src: Source, optional: set[str]) -> str:
    """``src``'s text with lolcats imports and module names made relative and optional imports
    wrapped in try blocks."""
    data = src.text.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def span(node) -> tuple[int, int]:
        return starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset

    def lines(node) -> tuple[int, int]:
        """The whole lines of a statement that starts its line (without the last newline)."""
        begin, end = starts[node.lineno - 1], starts[node.end_lineno]
        if data[begin:begin + node.col_offset].strip():
            raise _unsupported(src, node, "an optional package's import must start its line")
        return begin, end - 1 if data[end - 1:end] == b"\n" else end

    edits = []
    for node, target, _ in src.refs:
        if isinstance(node, ast.Constant):
            edits.append((*span(node), f'(__package__ + ".{flat_name(target)}")'))
        else:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            edits.append((*span(node), f"from .{flat_name(target)} import {names}"))
    for group in _runs({id(n): n for p, n in _third_party(src) if p in optional}.values()):
        begin, end = lines(group[0])[0], lines(group[-1])[1]
        edits.append((begin, end, _try_wrapped(data[begin:end].decode(), group[0].col_offset)))
    for begin, end, text in sorted(edits, reverse=True):
        data = data[:begin] + text.encode() + data[end:]
    header = f"# lolcats {lolcats.__version__}: {src.name}, copied by `lolcats export` with its imports made relative\n"
    return header + data.decode()


def _runs(nodes) -> list[list[ast.stmt]]:
    """Statements grouped into runs of adjacent lines at the same indentation."""
    runs: list[list[ast.stmt]] = []
    for node in sorted(nodes, key=lambda n: n.lineno):
        last = runs[-1][-1] if runs else None
        if last is not None and node.lineno == last.end_lineno + 1 and node.col_offset == last.col_offset:
            runs[-1].append(node)
        else:
            runs.append([node])
    return runs


def _try_wrapped(text: str, indent: int) -> str:
    pad = " " * indent
    body = "\n".join("    " + line for line in text.splitlines())
    return f"{pad}try:  # {OPTIONAL_NOTE}\n{body}\n{pad}except ImportError:\n{pad}    raise"
