"""docs/config.md is made from the settings and agrees with ``--help``."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from trioproxy._balance import GroupSpec
from trioproxy._cli import build_parser
from trioproxy._config import all_settings
from trioproxy._configdoc import EXAMPLE, render_config_doc
from trioproxy._configfile import load_settings
from trioproxy._routes import Route

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"


def rows(text: str) -> dict[str, list[str]]:
    """Table rows of a Markdown page by their first cell (a key in backticks)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        found.setdefault(cells[0].strip("`"), cells)
    return found


def test_the_page_is_what_the_fields_make() -> None:
    """Regenerating docs/config.md gives the same file: it cannot drift from
    the fields (run ``python scripts/config_doc.py`` after changing one)."""
    assert DOC.read_text(encoding="utf-8") == render_config_doc()


def test_the_page_and_help_agree() -> None:
    """Each setting's row has the flag and the help text ``--help`` shows for
    it, and says *restart* exactly for the settings a reload cannot change."""
    parser = build_parser()
    helps = {option: action.help for action in parser._actions for option in action.option_strings}
    documented = rows(DOC.read_text(encoding="utf-8"))
    for spec in all_settings():
        _key, flag, _value, _default, what = documented[spec.key]
        assert flag.strip("`").split()[0] == spec.flag
        restart = what.endswith(" *(restart)*")
        assert restart == spec.restart, spec.key
        text = what.removesuffix(" *(restart)*").removeprefix("false: ")
        assert text == helps[spec.flag], spec.key
    help_text = "".join(parser.format_help().split())  # argparse wraps at hyphens too
    for spec in all_settings():
        assert "".join(spec.help.split()) in help_text


def test_the_page_documents_every_group_and_route_key() -> None:
    text = DOC.read_text(encoding="utf-8")
    groups, routes = text.split("\n## Upstream groups", 1)[1].split("\n## Routes", 1)
    for table, fields in ((groups, GroupSpec.table_keys()), (routes, attrs.fields(Route))):
        documented = rows(table)
        assert set(documented) == {field.name for field in fields}
        for field in fields:
            assert documented[field.name][1] == field.metadata["value"]
            assert documented[field.name][3] == field.metadata["help"]


def test_every_toml_example_is_a_valid_config(tmp_path: Path) -> None:
    """The example at the top of docs/config.md, and every ``toml`` block of
    the README and the docs, pass validation."""
    blocks = [EXAMPLE]
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks += re.findall(r"```toml\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
    assert len(blocks) >= 3  # the example, its copy in docs/config.md, the README's
    for number, block in enumerate(blocks):
        path = tmp_path / f"example{number}.toml"
        path.write_text(block)
        load_settings(str(path), {})
