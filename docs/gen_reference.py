"""The docs pages that the code already knows, generated at every `mkdocs build` so they cannot drift.

    reference/config.md    every config key: default, type, choices (`choice(...)` metadata) and its comment in
                           glow_dist/config.py; the old keys and spellings that still load
    reference/cli.md       every command and option of `glow-dist` and the launchers, from their argparse parsers
    reference/configs.md   the shipped configs/*.yaml with their own comments
    reference/modules.md   the layers (import-linter contract in pyproject.toml) and every module's docstring
    benchmarks.md          BENCHMARKS.md, which stays the one place numbers are recorded

It is also the MkDocs hook (`hooks:` in mkdocs.yml): `on_files` adds the pages to the build. Run it by hand to see
them: `python docs/gen_reference.py OUT_DIR`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.metadata
import io
import re
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# Console scripts whose arguments are another tool's: documented by their docstring and that tool's --help.
WRAPS = {"glow_dist.distributed.launcher": "horovodrun"}


# --- the config reference -------------------------------------------------------------------------------------

def field_comments(source: str, class_name: str) -> dict[str, str]:
    """{field: comment} for one dataclass in `source`: the comment lines right above the field and the comment at
    the end of its line, joined. Comments are not in the AST, so they are read with tokenize."""
    comments: dict[int, tuple[str, bool]] = {}   # line -> (text, alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line[:tok.start[1]].strip() == ""
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name)
    found = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        after = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1)
                 if n in comments and not comments[n][1]]
        found[node.target.id] = " ".join(above + after)
    return found


def class_docstring(source: str, class_name: str) -> str:
    """The docstring as written (a dataclass without one gets its signature as __doc__, which is no help here)."""
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name)
    return ast.get_docstring(cls) or ""


def yaml_value(value: Any) -> str:
    """A default as one writes it in a config file or an override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value)


def type_name(typ: Any) -> str:
    if typing.get_origin(typ) is list:
        return f"list of {type_name(typing.get_args(typ)[0])}"
    return getattr(typ, "__name__", str(typ))


def cell(text: str) -> str:
    """Text that may stand in a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def config_keys() -> list[dict[str, Any]]:
    """Every key of the config tree: section, key, type, default, choices, comment, the section's docstring."""
    from glow_dist import config

    source = Path(config.__file__).read_text()
    keys = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints = typing.get_type_hints(cls)
        comments = field_comments(source, cls.__name__)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            keys.append({"section": section.name, "key": f.name, "dotted": f"{section.name}.{f.name}",
                         "type": type_name(hints[f.name]), "default": default,
                         "choices": f.metadata.get("choices", ()), "comment": comments.get(f.name, ""),
                         "section_doc": class_docstring(source, cls.__name__)})
    return keys


def config_page() -> str:
    from glow_dist import config

    out = ["# Configuration reference", "",
           "Generated from `glow_dist/config.py` at every docs build: every key with its type, default, choices "
           "and the comment beside it in the source. How a run's config is put together (defaults, a YAML file "
           "from `configs/`, `section.key=value` overrides) is on [Configuration](../configuration.md); the "
           "shipped files are on [Shipped configs](configs.md).", ""]
    section = None
    for k in config_keys():
        if k["section"] != section:
            section = k["section"]
            out += ["", f"## `{section}`", ""]
            if k["section_doc"]:
                out += [" ".join(k["section_doc"].split()), ""]
            out += ["| key | default | what it is |", "|---|---|---|"]
        what = k["comment"] or ""
        kind = f"{k['type']}; one of " + ", ".join(f"`{c}`" for c in k["choices"]) if k["choices"] else k["type"]
        out.append(f"| <span id=\"{k['dotted']}\"></span>`{k['dotted']}` | `{cell(yaml_value(k['default']))}` | "
                   f"{cell(what)}{' ' if what else ''}*({cell(kind)})* |")
    out += ["", "## Old keys that still load", "",
            "Config files and checkpoints written before a key moved or changed type load as they are: the old key "
            "is read at its new place, the old spelling as its new value.", "",
            "| old key | read as |", "|---|---|"]
    out += [f"| `{old}` | [`{new}`](#{new}) |" for old, new in config._MOVED_KEYS.items()]
    out += ["", "| key | old spelling | read as |", "|---|---|---|"]
    for key, table in config._OLD_SPELLINGS.items():
        for old, new in table.items():
            out.append(f"| [`{key}`](#{key}) | `{yaml_value(old)}` | `{new}` |")
    return "\n".join(out) + "\n"


# --- the command-line reference -------------------------------------------------------------------------------

def console_scripts() -> dict[str, str]:
    """{script name: module} of every command this package installs (pyproject's [project.scripts])."""
    eps = importlib.metadata.distribution("glow-dist").entry_points
    return {ep.name: ep.value.split(":")[0] for ep in eps if ep.group == "console_scripts"}


def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subs[0].choices) if subs else {}


def option_name(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(f"`{o}`" for o in action.option_strings)
    return f"`{action.metavar or action.dest}`"


def options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | what it is |", "|---|---|---|"]
    for a in parser_actions(parser):
        default = "" if a.default in (None, argparse.SUPPRESS) or a.required or a.nargs in ("*", "...") \
            else f"`{yaml_value(a.default)}`"
        notes = []
        if a.required and a.option_strings:
            notes.append("required")
        if a.choices:
            notes.append("one of " + ", ".join(f"`{c}`" for c in a.choices))
        if a.nargs in ("*", argparse.REMAINDER):
            notes.append("any number")
        extra = f" *({'; '.join(notes)})*" if notes else ""
        rows.append(f"| {option_name(a)} | {cell(default)} | {cell(a.help or '')}{extra} |")
    return rows


def usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split())


def command_section(title: str, parser: argparse.ArgumentParser, summary: str = "") -> list[str]:
    out = ["", f"## `{title}`", ""]
    if summary:
        out += [summary[0].upper() + summary[1:] + ".", ""]
    out += ["```text", usage(parser), "```", ""]
    if parser.description:
        out += ["```text", parser.description.strip(), "```", ""]
    return out + (options_table(parser) if parser_actions(parser) else [])


def cli_page() -> str:
    from glow_dist import cli

    top = cli.build_parser()
    out = ["# Command-line reference", "",
           "Generated from the argparse parsers at every docs build: every command the package installs and every "
           "option, with the text `--help` prints. Config-driven commands also take `section.key=value` overrides "
           "([configuration reference](config.md)).", ""]
    out += command_section("glow-dist", top)
    out += ["", "| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#glow-dist-{name}) | {cell(help_text)} |" for name, (_, help_text) in cli.COMMANDS.items()]
    for name, parser in subcommands(top).items():
        out += command_section(f"glow-dist {name}", parser, cli.COMMANDS[name][1])
    for script, module_name in sorted(console_scripts().items()):
        if module_name == cli.__name__:
            continue
        module = importlib.import_module(module_name)
        if hasattr(module, "build_parser"):
            out += command_section(script, module.build_parser())
        elif module_name in WRAPS:
            tool = WRAPS[module_name]
            out += ["", f"## `{script}`", "",
                    f"Takes the arguments of `{tool}` (`{tool} --help` lists them) and runs it; what differs:", "",
                    "```text", (module.__doc__ or "").strip(), "```"]
        else:
            raise RuntimeError(f"console script {script} ({module_name}) has no build_parser() for the command-line "
                               "reference (docs/gen_reference.py); give it one, or name the tool it wraps in WRAPS")
    return "\n".join(out) + "\n"


# --- the shipped configs --------------------------------------------------------------------------------------

def header_comment(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def configs_page() -> str:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    out = ["# Shipped configs", "",
           "Generated from `configs/*.yaml` at every docs build: each file's own comments, then the file. A config "
           "sets only what differs from the defaults ([configuration reference](config.md)).", "",
           "| file | what it is |", "|---|---|"]
    out += [f"| [`configs/{f.name}`](#{f.stem}) | {cell(header_comment(f.read_text()))} |" for f in files]
    for f in files:
        text = f.read_text()
        out += ["", f"## `configs/{f.name}` {{#{f.stem}}}", "", header_comment(text) or "(no header comment)", "",
                f'```yaml title="configs/{f.name}"', text.rstrip("\n"), "```"]
    return "\n".join(out) + "\n"


# --- the modules ----------------------------------------------------------------------------------------------

def importlinter_layers() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    return next(c["layers"] for c in contracts if c["type"] == "layers")


def module_docstring(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def modules_page() -> str:
    package = ROOT / "glow_dist"
    out = ["# Modules and layers", "",
           "Generated at every docs build from `pyproject.toml`'s import-linter contract and each module's "
           "docstring. [Architecture](../architecture.md) explains the design.", "",
           "## Layers", "",
           "Top to bottom; a module may import only from layers below its own (`make lint` checks it). "
           "Modules on one line are independent of each other.", "",
           "| layer | modules |", "|---|---|"]
    for i, layer in enumerate(importlinter_layers(), 1):
        out.append(f"| {i} | " + ", ".join(f"`{m.strip()}`" for m in layer.split("|")) + " |")
    folders: dict[str, list[Path]] = {}
    for path in sorted(package.rglob("*.py")):
        folders.setdefault(str(path.parent.relative_to(ROOT)), []).append(path)
    for folder, paths in folders.items():
        out += ["", f"## `{folder}/`", "", "| module | what it is |", "|---|---|"]
        out += [f"| `{p.name}` | {cell(module_docstring(p))} |" for p in paths]
    return "\n".join(out) + "\n"


# --- benchmarks -----------------------------------------------------------------------------------------------

def blank_line_before_lists(text: str) -> str:
    """GitHub starts a list right after a paragraph's line; Python-Markdown needs a blank line first."""
    out: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if (not fenced and re.match(r"(- |\d+\. )", line) and out and out[-1].strip()
                and not re.match(r"(- |\d+\. |  )", out[-1])):
            out.append("")
        out.append(line)
    return "\n".join(out)


def benchmarks_page() -> str:
    text = blank_line_before_lists((ROOT / "BENCHMARKS.md").read_text())
    title, _, rest = text.partition("\n")
    note = ("*This page is `BENCHMARKS.md` from the repository's root, included at every docs build: every number "
            "is recorded there, with the command that measured it and the machine.*")
    return f"{title}\n\n{note}\n{rest}"


def pages() -> dict[str, str]:
    """{path under docs/: Markdown} of every generated page."""
    return {"reference/config.md": config_page(), "reference/cli.md": cli_page(),
            "reference/configs.md": configs_page(), "reference/modules.md": modules_page(),
            "benchmarks.md": benchmarks_page()}


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: the generated pages join the build (nothing is written into docs/)."""
    from mkdocs.structure.files import File

    for path, content in pages().items():
        old = files.get_file_from_path(path)
        if old is not None:
            files.remove(old)
        files.append(File.generated(config, path, content=content))
    return files


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "build/docs-reference")
    for path, content in pages().items():
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / path).write_text(content)
        print(out_dir / path)
