"""The README stays short and true: its quick commands run as written."""

import glob
import shlex

from cityseg.cli import main
from tests.conftest import REPO

QUICK = ("validate", "show", "list")  # the README's commands that take seconds, not minutes


def readme_commands() -> list[list[str]]:
    """Each `cityseg ...` command line of the README's code blocks, as the shell splits it."""
    lines = (REPO / "README.md").read_text().splitlines()
    return [shlex.split(line.strip(), comments=True) for line in lines
            if line.startswith("    ") and line.strip().startswith("cityseg ")]


def test_the_readme_is_short_and_its_quick_commands_run_as_written(monkeypatch, capsys):
    assert len((REPO / "README.md").read_text().splitlines()) < 200
    monkeypatch.chdir(REPO)  # the README's paths are the repository's
    quick = [c for c in readme_commands() if c[1] in QUICK]
    assert sorted(c[1] for c in quick) == sorted(QUICK)
    for command in quick:
        # the shell's globbing (experiments/*.yaml), then the command itself
        args = [m for a in command[1:] for m in (sorted(glob.glob(a)) if "*" in a else [a])]
        assert main(args) == 0, (command, capsys.readouterr())
    out = capsys.readouterr().out
    assert "pos_weight: 8" in out and "weighted_bce" in out  # show's config; list's losses
