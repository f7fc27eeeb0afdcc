"""The docs site: the generated reference pages cover every config key, command and option; the README's links
resolve; `mkdocs build --strict` passes (broken links and anchors, pages missing from the navigation fail it)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "docs"))

import gen_reference  # noqa: E402  (docs/ is not a package: the generator is also the site's MkDocs hook)

from glow_dist import cli, config  # noqa: E402


def section_of(page: str, title: str) -> str:
    """The text of one `## title` section of a generated page."""
    parts = re.split(r"(?m)^## ", page)
    found = [p for p in parts if p.startswith(title + "\n") or p.startswith(title + " ")]
    assert found, f"no section {title!r} in the page"
    return found[0]


def trailing_comments(source: str, class_name: str) -> dict[str, str]:
    """{field: its end-of-line comment} of one class, read with a regex: a second way to find what the generator
    must show."""
    block = source.split(f"\nclass {class_name}:", 1)[1].split("\n\n\n", 1)[0]
    return {m[1]: m[2].strip() for m in re.finditer(r"(?m)^    (\w+): [^=\n]+=.*?  # (.+)$", block)}


def test_config_reference_has_every_key_default_choice_and_comment():
    page = gen_reference.config_page()
    source = Path(config.__file__).read_text()
    uncommented = []
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        body = section_of(page, f"`{section.name}`")
        trailing = trailing_comments(source, cls.__name__)
        assert trailing, cls.__name__
        for f in dataclasses.fields(cls):
            dotted = f"{section.name}.{f.name}"
            row = next((line for line in body.splitlines() if f'id="{dotted}"' in line), None)
            assert row is not None, f"{dotted} is missing from the configuration reference"
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            assert f"`{gen_reference.cell(gen_reference.yaml_value(default))}`" in row, (dotted, row)
            for option in f.metadata.get("choices", ()):
                assert f"`{option}`" in row, f"{dotted}: choice {option!r} missing: {row}"
            if f.name in trailing:
                assert gen_reference.cell(trailing[f.name]) in row, f"{dotted}: its comment is missing: {row}"
            if not gen_reference.field_comments(source, cls.__name__)[f.name]:
                uncommented.append(dotted)
    assert not uncommented, (f"config keys without a comment in glow_dist/config.py: {', '.join(uncommented)}; the "
                             "configuration reference shows that comment: say what the key is")
    for old, new in config._MOVED_KEYS.items():
        assert f"| `{old}` | [`{new}`](#{new}) |" in page


def test_cli_reference_has_every_command_and_option():
    page = gen_reference.cli_page()
    top = cli.build_parser()
    commands = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    assert set(commands) == set(cli.COMMANDS)
    for name, parser in commands.items():
        body = section_of(page, f"`glow-dist {name}`")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for option in names:
                assert f"`{option}`" in body, f"glow-dist {name}: {option} is missing from the command-line reference"
            assert action.help, f"glow-dist {name} {names[0]} has no help text; the reference shows it"
            assert action.help in body.replace("\\|", "|")
    scripts = gen_reference.console_scripts()
    assert {"glow-dist", "glow-dist-horovodrun", "glow-dist-srun"} <= set(scripts)
    for script in scripts:
        section_of(page, f"`{script}`")   # every installed command has its section
    srun = section_of(page, "`glow-dist-srun`")
    for option in ("-np", "--num-proc", "--network-interface", "--start-timeout", "--srun-args"):
        assert f"`{option}`" in srun


def test_configs_page_shows_every_config_file_with_its_comments():
    page = gen_reference.configs_page()
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for path in files:
        body = section_of(page, f"`configs/{path.name}`")
        assert path.read_text().rstrip("\n") in body, f"{path.name} is not shown whole"
        assert gen_reference.header_comment(path.read_text()) in body


def test_modules_page_names_every_module_and_layer():
    page = gen_reference.modules_page()
    for path in (REPO / "glow_dist").rglob("*.py"):
        assert f"| `{path.name}` |" in section_of(page, f"`{path.parent.relative_to(REPO)}/`")
    for layer in gen_reference.importlinter_layers():
        for module in layer.split("|"):
            assert f"`{module.strip()}`" in page


def slug(heading: str) -> str:
    """GitHub's (and MkDocs') anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_resolve_and_it_stays_short():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md is meant to be a screen or two; detail goes into docs/"
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = REPO / path if path else REPO / "README.md"
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor and target.suffix == ".md":
            headings = re.findall(r"(?m)^#+ (.+)$", target.read_text())
            assert anchor in {slug(h) for h in headings}, f"README.md links to {link}: no such heading"


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    config_page = (site / "reference" / "config" / "index.html").read_text()
    assert 'id="runtime.memory"' in config_page
    assert "glow-dist-srun" in (site / "reference" / "cli" / "index.html").read_text()
    assert (site / "mlflow-run-page.png").is_file()
