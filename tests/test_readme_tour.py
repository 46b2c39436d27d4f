"""README's tour runs as written (issue #20, item 8): the console blocks of its "A short tour"
and "Pipeline" sections, in order, in one shell, with the console script of this
environment, in a temporary directory. Only what must be is substituted: the tour's
directory (``/tmp/tour``) becomes one under pytest's tmp_path, ``.venv/bin/activate`` this
environment's, and ``regionvault run`` (which ticks until SIGTERM) is sent SIGTERM once its
first tick has printed. Each command must exit as the tour implies (0, or what its comment
says, such as ``audit``'s ``(exit 1: one failed)``), and each output line the tour shows must
be printed by its command (``…`` and example ids, numbers standing for any).

Clean-up: the instances the tour's ``restore --launch`` starts are terminated by the tour
itself when it says ``instances terminate`` (then the test checks that nothing it launched
is left running); a tour without that line leaves them running, and the test terminates them
through the Python API afterwards (``Compute.terminate``)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from regionvault.core.site import Site

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TOUR_DIR = "/tmp/tour"
SECTIONS = ("## A short tour", "## Pipeline")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)

    @property
    def comment(self) -> str:
        """The tour's comment on the command (after `` # ``), if any."""
        text = self.command
        # the first " #" outside quotes starts the comment
        quote: str | None = None
        for i, ch in enumerate(text):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#" and i > 0 and text[i - 1] == " ":
                return text[i + 1 :].strip()
        return ""

    @property
    def allowed_exits(self) -> set[int]:
        """0, and any ``exit N`` the tour's comment names."""
        return {0} | {int(n) for n in re.findall(r"\bexit (\d+)\b", self.comment)}


def tour_steps(readme: str) -> list[Step]:
    """The console blocks of the tour's sections, as commands (``$ ``, continued by a
    trailing backslash) with the output lines shown after each."""
    steps: list[Step] = []
    for heading in SECTIONS:
        start = readme.index(heading)
        end = readme.find("\n## ", start + len(heading))
        section = readme[start : end if end != -1 else len(readme)]
        blocks = re.findall(r"```console\n(.*?)```", section, flags=re.S)
        assert blocks, f"README's {heading!r} has no console block"
        for block in blocks:
            lines = block.splitlines()
            i = 0
            while i < len(lines):
                line = lines[i]
                if line.startswith("$ "):
                    command = line[2:]
                    while command.rstrip().endswith("\\") and i + 1 < len(lines):
                        i += 1
                        command += "\n" + lines[i]
                    steps.append(Step(command))
                elif line.strip():
                    assert steps, f"output before any command in {heading!r}: {line!r}"
                    steps[-1].expected.append(line)
                i += 1
    return steps


_PLACEHOLDER = re.compile(r"…|i-[0-9a-f]{16}|[0-9]+(?:\.[0-9]+)?")


def output_pattern(line: str) -> re.Pattern[str]:
    """A tour output line as a pattern: ``…`` stands for anything, an example instance id
    for any id, a number for any number."""
    parts: list[str] = []
    last = 0
    for m in _PLACEHOLDER.finditer(line):
        parts.append(re.escape(line[last : m.start()]))
        token = m.group()
        if token == "…":
            parts.append(".*")
        elif token.startswith("i-"):
            parts.append(r"i-[0-9a-f]+")
        else:
            parts.append(r"[0-9]+(?:\.[0-9]+)?")
        last = m.end()
    parts.append(re.escape(line[last:]))
    return re.compile("".join(parts))


def substitute(command: str, tour: Path) -> str:
    command = command.replace(".venv/bin/activate", str(BIN / "activate"))
    return command.replace(TOUR_DIR, str(tour))


def shell_script(steps: list[Step], tour: Path, out: Path) -> str:
    """One bash script running every step in order, each one's stdout, stderr and exit
    status kept in ``out``/<n>.{out,err,rc}; a failing step does not stop the others from
    being recorded, but a step that exits other than allowed is reported by the test."""
    lines = ["set -o pipefail", "cd " + shlex.quote(str(tour.parent))]
    for n, step in enumerate(steps):
        command = substitute(step.command, tour)
        o, e, rc = (shlex.quote(str(out / f"{n}.{kind}")) for kind in ("out", "err", "rc"))
        if re.match(r"regionvault run\b", command):
            # ticks until SIGTERM: send it once the first tick has printed (bounded wait)
            lines += [
                f"{command.split('#')[0].strip()} >{o} 2>{e} &",
                "pid=$!",
                f"for i in $(seq 1200); do [ -s {o} ] && break; sleep 0.1; done",
                'kill -TERM "$pid"',
                'wait "$pid"',
                f"echo $? >{rc}",
            ]
            continue
        # { ...; } keeps cd and variable assignments in this shell
        lines += [f"{{ {command}\n}} >{o} 2>{e}", f"echo $? >{rc}"]
    return "\n".join(lines) + "\n"


def running_instances(tour: Path, region: str) -> list[str]:
    site = Site.load(tour / "site.toml")
    try:
        return [i.id for i in site.region(region).compute.list_instances()]
    finally:
        site.close()


def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    if not (BIN / "regionvault").is_file() or not (BIN / "activate").is_file():
        pytest.skip(f"no virtual environment with the console script at {BIN}")
    steps = tour_steps(README.read_text(encoding="utf-8"))
    commands = [s.command for s in steps]
    assert any("regionvault init" in c for c in commands), "the tour no longer runs init"
    assert any("--launch" in c for c in commands), "the tour no longer launches"
    tour = tmp_path / "tour"
    out = tmp_path / "out"
    out.mkdir()
    script = shell_script(steps, tour, out)
    (tmp_path / "tour.sh").write_text(script)
    cleans_up = any("instances terminate" in c for c in commands)
    try:
        subprocess.run(
            ["bash", str(tmp_path / "tour.sh")],
            cwd=tmp_path,
            timeout=600,
            check=False,
            capture_output=True,
        )
        for n, step in enumerate(steps):
            rc_file = out / f"{n}.rc"
            assert rc_file.is_file(), f"tour step {n} never ran: {step.command}"
            rc = int(rc_file.read_text().strip())
            printed = (out / f"{n}.out").read_text() + (out / f"{n}.err").read_text()
            assert rc in step.allowed_exits, (
                f"tour step `{step.command}` exited {rc} (the tour implies "
                f"{sorted(step.allowed_exits)}):\n{printed}"
            )
            for expected in step.expected:
                pattern = output_pattern(expected)
                assert any(pattern.fullmatch(line) for line in printed.splitlines()), (
                    f"tour step `{step.command}` did not print {expected!r}:\n{printed}"
                )
        if cleans_up:
            assert running_instances(tour, "local:west") == [], "the tour left an instance running"
    finally:
        if (tour / "site.toml").is_file():
            site = Site.load(tour / "site.toml")
            try:
                compute = site.region("local:west").compute
                for instance in list(compute.list_instances()):
                    compute.terminate(instance.id)
            finally:
                site.close()
