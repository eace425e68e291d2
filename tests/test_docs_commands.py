"""The compare.py commands that the README, docs/ and compare.py's help show are ones compare.py accepts."""
import re
import shlex
from pathlib import Path

import pytest

import compare

ROOT = Path(__file__).resolve().parents[1]


COMMAND = r"(?:\w+=\S+ )*python3? compare\.py"  # perhaps after environment variables


def shown_commands():
    """Each compare.py command of a code block (after any `$ ` prompt, continuation lines joined, comments cut) or
    in backticks (over line breaks), but those that elide flags or need a SLURM cluster."""
    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "compare.py"]:
        text = path.read_text().replace("\\\n", " ")
        lines = re.findall(rf"^\s*(?:\$ )?({COMMAND}[^\n`]*)", text, flags=re.MULTILINE)
        inline = [" ".join(found.split()) for found in re.findall(rf"`({COMMAND}[^`]*)`", text)]
        for line in lines + inline:
            line = line.split("  #")[0].strip()
            if "..." not in line and "--launcher slurm" not in line:
                commands.append((path.relative_to(ROOT).as_posix(), line))
    return sorted(set(commands))


@pytest.mark.parametrize("where,line", shown_commands())
def test_a_shown_comparison_plans_its_runs(where, line, tmp_path, tiny_text_file, capsys):
    argv = shlex.split(line)
    argv = argv[argv.index("compare.py") + 1:]
    assert compare.main([*argv, "--data", str(tiny_text_file), "--runs", str(tmp_path / "runs"),
                         "--out", str(tmp_path / "out"), "--report_only"]) == 2
    error = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]  # after any progress bar
    assert error.startswith("error: --report_only needs every run finished"), where


def test_the_docs_give_each_shipped_report_the_command_that_made_it():
    """Only a shipped report's own command writes over it, flag for flag (report.check_report_owner): the README or
    docs must show that command whole, with its flags in its order, for --report_only to rebuild the report."""
    shown = [shlex.split(line) for where, line in shown_commands() if where != "compare.py"]
    made_by = {str(p.relative_to(ROOT)): shlex.split(p.read_text(encoding="utf-8").split("`")[1])
               for p in sorted((ROOT / "plots").rglob("*.md")) if "\nMade by `python compare.py " in p.read_text()}
    assert len(made_by) == 6
    assert {path: shlex.join(command) for path, command in made_by.items() if command not in shown} == {}
