"""README.md names only commands that exist: every `dog ...` and `sheep ...` in its
code blocks and inline code resolves in the click command tree, with the options it
uses. In-process, on the click objects, so it takes milliseconds.

Also here, for the same new user: `dog --help` shows whole first sentences, and the
drawings of docs/deployment.md are rendered from their current sources.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import click
import pytest

from dog.main import dog
from sheep.main import command as sheep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

# After ' | ', a synopsis lists alternatives ('dog vdi lock list | lock unlock NAME');
# a pipeline names another program. These are the programs, not ours to check:
NOT_OURS = {
    "head": "a pipeline: 'dog vdi read ... | xxd | head -2'",
    "xxd": "a pipeline: 'dog vdi read ... | xxd'",
    "ssh": "a pipeline: 'dog vdi export-diff ... - | ssh backup ...'",
}

# '|' only with spaces around it: 'FILE|-' and 'ADDRESS|PID|--all' are alternatives.
_shell_separators = re.compile(r"\|\||&&|;|\$\(|(?<=\s)\|(?=\s)")
_shell_prefix = re.compile(r"^(?:(?:do|then|else|time|sudo|exec)\s+|[A-Z_][A-Z0-9_]*=\S*\s+)+")
_synopsis_comment = re.compile(r"\s+#|\s+\(")  # '  # why' and ' (what it does)'
_inline_code = re.compile(r"`([^`]+)`")
_roots: dict[str, click.Command] = {"dog": dog, "sheep": sheep}


@dataclass(frozen=True)
class Mention:
    line: int  # where in README.md, 1-based
    text: str  # 'dog vdi trash mv NAME [--expires-in 7d]'


def _split_shell(text: str) -> list[str]:
    """Pipeline and list segments, at brackets' depth 0 only: in a synopsis
    '[--listen HOST:PORT | --unix PATH]' is one segment."""
    segments, depth, start = [], 0, 0
    for match in re.finditer(r"[\[\]]|" + _shell_separators.pattern, text):
        token = match.group()
        if token == "[":
            depth += 1
        elif token == "]":
            depth = max(0, depth - 1)
        elif depth == 0:
            segments.append(text[start:match.start()])
            start = match.end()
    segments.append(text[start:])
    return [_shell_prefix.sub("", segment.strip()) for segment in segments]


def _ours(segment: str) -> bool:
    return segment.split(" ", 1)[0] in _roots and " " in segment


def _option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def _takes_value(command: click.Command, name: str) -> bool:
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return not param.is_flag and not param.count
    return False


def _options_in(token: str) -> list[str]:
    """The options a synopsis token names: '[--copies', '--max-rate/--watch',
    '[NAME|--all]', '--listen=HOST:PORT'."""
    found = []
    for part in re.split(r"[|/]", token):
        part = part.strip("[](),").split("=", 1)[0]
        if re.fullmatch(r"--[a-z][a-z0-9-]*|-[a-zA-Z]", part):
            found.append(part)
    return found


@dataclass
class Walk:
    """How far a command line resolves in the click tree."""

    groups: list[tuple[list[str], click.Group]]  # every group passed, outermost first
    command: click.Command  # where the walk stopped
    path: list[str]  # its name: ['dog', 'vdi', 'trash', 'mv']
    rest: list[str]  # the tokens after it: arguments and options
    problem: str | None = None


def walk(text: str) -> Walk:
    tokens = text.split()
    command = _roots[tokens[0]]
    path = [tokens[0]]
    groups: list[tuple[list[str], click.Group]] = []
    index = 1
    while isinstance(command, click.Group) and index < len(tokens):
        groups.append((path, command))
        token = tokens[index].strip("[]()`,")
        if token.startswith("-"):
            if token.split("=", 1)[0] not in _option_names(command):
                return Walk(groups, command, path, [], f"'{' '.join(path)}' has no option {token}")
            index += 2 if "=" not in token and _takes_value(command, token) else 1
            continue
        if not re.fullmatch(r"[a-z][a-z0-9-]*", token):
            return Walk(groups, command, path, [])  # a placeholder: 'dog vdi ...'
        sub = command.commands.get(token)
        if sub is None:
            return Walk(groups, command, path, [], f"'{' '.join(path)}' has no command '{token}'")
        command, path = sub, [*path, token]
        index += 1
    return Walk(groups, command, path, tokens[index:])


def check(text: str) -> str | None:
    """Why text is not a command of ours, or None if it is."""
    found = walk(text)
    if found.problem is not None:
        return found.problem
    names = _option_names(found.command)
    for token in found.rest:
        for option in _options_in(token):
            if option not in names:
                return f"'{' '.join(found.path)}' has no option {option}"
    return None


def _alternative(previous: str, segment: str) -> str | None:
    """A synopsis's alternatives after ' | ' name commands beside the previous one:
    'dog vdi lock list | lock unlock NAME' is also 'dog vdi lock unlock NAME'. None for
    another program (NOT_OURS); a word no group knows is checked, and fails, in the
    innermost group."""
    word = segment.split(" ", 1)[0]
    groups = walk(previous).groups
    if word in NOT_OURS or not groups:
        return None
    for path, group in reversed(groups):
        if word in group.commands:
            return " ".join([*path, segment])
    return " ".join([*groups[-1][0], segment])


def mentions(markdown: str) -> list[Mention]:
    """Every `dog ...`/`sheep ...` command in code blocks (fenced, or indented four
    spaces after a blank line) and in inline code, comments cut off."""
    found: list[Mention] = []

    def add(number: int, text: str) -> None:
        previous = None
        for segment in _split_shell(text):
            if _ours(segment):
                previous = segment
            elif previous is not None and segment:
                previous = _alternative(previous, segment)
            else:
                continue
            if previous is not None:
                found.append(Mention(number, previous))

    fenced = False
    code = False  # inside an indented code block
    paragraph: list[tuple[int, str]] = []
    continued = ""  # a code line ending in a backslash, and its number
    continued_at = 0

    def flush() -> None:
        text = " ".join(line for _, line in paragraph)
        for match in _inline_code.finditer(text):
            add(paragraph[0][0], match.group(1))
        paragraph.clear()

    previous_blank = True
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        blank = not line.strip()
        code = (fenced or (not blank and len(line) - len(line.lstrip()) >= 4
                           and (previous_blank or code)))
        if code:
            command = _synopsis_comment.split(line.strip(), maxsplit=1)[0]
            if command.endswith("\\"):
                continued, continued_at = continued + command[:-1], continued_at or number
            else:
                add(continued_at or number, continued + command)
                continued, continued_at = "", 0
        elif blank:
            flush()
        else:
            paragraph.append((number, line.strip()))
        previous_blank = blank
    flush()
    return found


def test_mentions_are_found():
    """The extraction itself, on the shapes the README uses."""
    markdown = "\n".join([
        "Run `dog cluster info` or `echo x | dog vdi write a 0`; not `dogma`.",
        "",
        "    for i in 0 1; do sheep /tmp/store/$i -p 700$i; done",
        "    dog nbd serve [--listen HOST:PORT | --unix PATH]   (the NBD side)",
        "    dog vdi create alice 256G          # a thin virtual disk",
        "",
        "1. A step:",
        "",
        "       dog auth new-keyring /etc/sheepdog/keyring",
        "",
        "```",
        "DOG_PORT=7001 dog node list && dog cluster check --no-wait",
        "dog vdi lock list | lock unlock NAME | xxd",
        "dog vdi read NAME 0 512 | head -2",
        "sheep DIR -b 10.0.0.11 \\",
        "    -c zookeeper:10.0.0.1:2181/sheepdog",
        "```",
    ])
    assert [mention.text for mention in mentions(markdown)] == [
        "dog cluster info", "dog vdi write a 0",
        "sheep /tmp/store/$i -p 700$i",
        "dog nbd serve [--listen HOST:PORT | --unix PATH]",
        "dog vdi create alice 256G",
        "dog auth new-keyring /etc/sheepdog/keyring",
        "dog node list", "dog cluster check --no-wait",
        "dog vdi lock list", "dog vdi lock unlock NAME",
        "dog vdi read NAME 0 512",
        "sheep DIR -b 10.0.0.11 -c zookeeper:10.0.0.1:2181/sheepdog",
    ]


@pytest.mark.parametrize(("text", "why"), [
    ("dog vdi trash mv NAME [--expires-in 7d]", None),
    ("dog --keyring FILE cluster format -a 10.0.0.11 --copies 3", None),
    ("dog node recovery --max-rate/--watch", None),
    ("dog vdi ...", None),
    ("dog nbd stop ADDRESS|PID|--all", None),
    ("dog vdi trash purge [NAME|--all]", None),
    ("sheep DIR -b 10.0.0.11 --keyring FILE -c zookeeper:10.0.0.1:2181", None),
    ("dog vdi trash move NAME", "'dog vdi trash' has no command 'move'"),
    ("dog vdi create NAME SIZE [--copys N]", "'dog vdi create' has no option --copys"),
    ("dog --bogus cluster info", "'dog' has no option --bogus"),
    ("sheep DIR --zookeeper", "'sheep' has no option --zookeeper"),
    ("dog vdi trash purge [NAME|--every]", "'dog vdi trash purge' has no option --every"),
    ("dog vdi snapshot -x TAG NAME", "'dog vdi snapshot' has no option -x"),
])
def test_check(text, why):
    assert check(text) == why


def test_readme_names_only_commands_that_exist():
    with open(README) as file:
        found = mentions(file.read())
    assert len(found) > 50, "the README's commands were not found: is the parser broken?"
    problems = [f"README.md:{mention.line}: {mention.text}: {why}" for mention in found
                if (why := check(mention.text))]
    assert not problems, "\n".join(problems)


def _commands(group: click.Group, path: str):
    for name, sub in group.commands.items():
        yield f"{path} {name}", sub
        if isinstance(sub, click.Group):
            yield from _commands(sub, f"{path} {name}")


def test_short_help_is_a_whole_sentence():
    """click's short help (dog --help's command list) ends at the first '.': one in
    'e.g.' cuts it off mid-sentence."""
    cut = [f"{path}: {short!r}" for path, sub in _commands(dog, "dog")
           if re.search(r"\b(e\.g|i\.e|cf|vs)\.$", short := sub.get_short_help_str(limit=1000))]
    assert not cut, "\n".join(cut)


def test_drawings_are_rendered_from_their_sources():
    """docs/diagrams/*.svg are committed: each must come from its .dot as it is now
    (scripts/diagrams renders them; --check needs no Graphviz), and the docs show each."""
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "diagrams"), "--check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(os.path.join(ROOT, "docs", "deployment.md")) as file:
        deployment = file.read()
    for name in sorted(os.listdir(os.path.join(ROOT, "docs", "diagrams"))):
        if name.endswith(".svg"):
            assert f"](diagrams/{name})" in deployment, f"docs/deployment.md does not show {name}"
