"""The commands the docs give users parse against the real command line: every ``biaslab …`` line in a code block of
README.md, docs/ and bench/README.md names a command that exists, options it has, and values its options accept —
so a renamed option or command cannot leave a page telling users to run something that fails."""
import functools
import re
import shlex
from pathlib import Path

import pytest
import typer

from biaslab.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "bench" / "README.md"]
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
LAUNCHERS = ("srun", "mpirun", "mpiexec", "env", "time", "nohup", "exec")   # what may start biaslab itself


def documented_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, arguments after ``biaslab``) of each command line in the page's code blocks: continuation lines joined,
    comments and what follows a pipe or redirection dropped; ``biaslab`` as the command (after ``VAR=value``
    assignments or a launcher such as ``srun -K``), as a path ending in ``/biaslab``, or after ``-m`` (torchrun,
    accelerate launch, python)."""
    found = []
    for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        first = text[:block.start()].count("\n") + 2
        lines, start, buf = block.group(1).split("\n"), None, ""
        for k, line in enumerate(lines):
            start = first + k if start is None else start
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            try:
                toks = shlex.split(buf, comments=True)
            except ValueError:   # not shell (a table, a prompt with quotes): nothing to check
                toks = []
            for i, t in enumerate(toks):
                as_command = i == 0 or toks[i - 1] == "-m" or all(
                    ASSIGNMENT.fullmatch(p) or p.startswith("-") or p.isdigit() or p in LAUNCHERS for p in toks[:i])
                if t == "biaslab" and as_command or t.endswith("/biaslab"):
                    args = toks[i + 1:]
                    for j, a in enumerate(args):
                        if a in ("|", "||", "&&", ";", ">", ">>", "2>&1") or a.startswith((">", "2>")):
                            args = args[:j]
                            break
                    found.append((start, args))
                    break
            start, buf = None, ""
    return found


@functools.cache
def root_command():
    """The click command typer builds from the app (built once: every page's commands parse against it)."""
    return typer.main.get_command(app)


def parse(args: list[str]):
    """Parse ``biaslab ARGS`` as the CLI would, invoking nothing: the leaf command, or the error click raises."""
    cmd = root_command()
    ctx = cmd.make_context("biaslab", list(args))
    while hasattr(cmd, "resolve_command"):   # a group: descend into the subcommand named
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            break
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return cmd


def test_the_finder_reads_shell_as_a_user_would():
    page = ("text `biaslab not-a-block`\n```bash\nBIASLAB_TREE_KERNEL=flex biaslab audit --model m \\\n"
            "    --bench bbq --out r   # a comment\n torchrun --nproc_per_node=2 -m biaslab env | tee x\n"
            "pip install biaslab\n.venv/bin/biaslab check runs/a > out.txt\nsrun -K -n 4 biaslab models\n```\n")
    assert documented_commands(page) == [(3, ["audit", "--model", "m", "--bench", "bbq", "--out", "r"]),
                                         (5, ["env"]), (7, ["check", "runs/a"]), (8, ["models"])]


STALE = [(["audti"], "No such command"), (["audit", "--benchh", "bbq"], "No such option"),
         (["audit", "--seed", "one"], "valid integer"), (["check"], "Missing"), (["env", "extra"], "unexpected extra")]


@pytest.mark.parametrize("args, error", STALE)
def test_a_stale_command_fails_the_parse(args, error):
    with pytest.raises(Exception, match=error):
        parse(args)


def test_every_documented_command_parses():
    checked, bad = 0, []
    for page in PAGES:
        for line, args in documented_commands(page.read_text()):
            checked += 1
            try:
                parse(args)
            except Exception as e:   # click's usage errors, and typer's own (vendored click) exceptions
                msg = e.format_message() if hasattr(e, "format_message") else str(e)
                bad.append(f"{page.relative_to(ROOT)}:{line}: biaslab {shlex.join(args)} -> {msg}")
    assert checked >= 40, checked   # the finder still finds the pages' commands
    assert not bad, "\n".join(bad)


def synopsis_commands(span: str, group=None) -> list:
    """The commands an inline synopsis such as ``biaslab mitigate cc|dc --task … --out DIR`` names: a word with
    ``|`` names each alternative, an upper-case placeholder (``METHOD``) every command of its group."""
    group = group or root_command()
    words = span.replace("\\|", "|").split()
    if not words or not hasattr(group, "get_command") or words[0].startswith("-"):
        return [(group, " ".join(words))]
    head, rest = words[0], " ".join(words[1:])
    if head.isupper():
        names = group.list_commands(None)
    elif re.fullmatch(r"[a-z][a-z0-9-]*(\|[a-z][a-z0-9-]*)*", head):
        names = head.split("|")
    else:   # a value, not a command: the group itself takes what follows
        return [(group, " ".join(words))]
    out = []
    for name in names:
        sub = group.get_command(None, name)
        out += [(None, name)] if sub is None else synopsis_commands(rest, sub)
    return out


def test_every_inline_synopsis_names_real_commands_and_options():
    """The one-line synopses (README's verb table, ``biaslab …`` spans in docs/) name real commands and options."""
    checked, bad = 0, []
    for page in PAGES[:-1]:   # bench/README.md's inline spans are table labels ("biaslab bbq default"), not commands
        text = page.read_text()
        for m in re.finditer(r"(?<!`)`biaslab ([^`\n]+)`", text):
            line = text[:m.start()].count("\n") + 1
            for cmd, rest in synopsis_commands(m.group(1)):
                checked += 1
                if cmd is None:
                    bad.append(f"{page.relative_to(ROOT)}:{line}: no command {rest!r} in `biaslab {m.group(1)}`")
                    continue
                opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
                unknown = sorted(set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest)) - opts)
                if unknown:
                    bad.append(f"{page.relative_to(ROOT)}:{line}: {cmd.name}: no option {', '.join(unknown)} "
                               f"in `biaslab {m.group(1)}`")
    assert checked >= 50, checked
    assert not bad, "\n".join(bad)


def test_a_stale_synopsis_is_found():
    names = [(c.name if c is not None else None, rest) for c, rest in synopsis_commands("mitigate cc|dc --task x")]
    assert names == [("cc", "--task x"), ("dc", "--task x")]
    assert [c for c, _ in synopsis_commands("mitigat --task x")] == [None]
