"""README stays true: its test command is what CI runs, and its settings table is complete."""

from __future__ import annotations

from pathlib import Path

from service.cli_settings import settings_from_args
from service.settings import Settings, readme_with_table

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q"
    assert command in readme and command in ci


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table(readme) == readme, "README settings table is stale: python -m service.settings --write-readme"
    missing = [f"GENCLIP_{name.upper()}" for name in Settings.model_fields if f"GENCLIP_{name.upper()}" not in readme]
    assert not missing, f"README lacks {missing}"


def test_cli_flags_come_from_the_settings() -> None:
    from service.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings}
    for name in ("redis_url", "max_batch", "backbone_weights", "workers_inline"):
        assert "--" + name.replace("_", "-") in flags
    args = parser.parse_args(["serve", "--max-batch", "3", "--no-workers-inline"])
    settings = settings_from_args(args)
    assert settings.max_batch == 3 and settings.workers_inline is False
