"""Commands come from the ``regionvault.cli`` entry-point group: the built-in ones and the
demo are entry points of the regionvault distribution; an outside distribution's command
appears in ``--help`` and runs; an entry point that does not load, or a name two entry
points claim, is one line naming them, and leaves every other command working."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest
from cli_support import ok, run
from click.testing import CliRunner, Result
from regionvault.core.cli import GROUP, cli
from regionvault.core.cli.root import RegionVaultGroup

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"

BUILT_IN = {
    "init": "regionvault.core.cli.site:init",
    "regions": "regionvault.core.cli.site:regions",
    "instances": "regionvault.core.cli.site:instances",
    "status": "regionvault.core.cli.site:status",
    "jobs": "regionvault.core.cli.site:jobs",
    "backup": "regionvault.core.cli.backup:backup",
    "restore": "regionvault.core.cli.backup:restore",
    "points": "regionvault.core.cli.backup:points",
    "copy": "regionvault.core.cli.copy:copy",
    "verify": "regionvault.core.cli.maintenance:verify",
    "prune": "regionvault.core.cli.maintenance:prune",
    "rebuild-index": "regionvault.core.cli.maintenance:rebuild_index",
    "rotate-keys": "regionvault.core.cli.keys:rotate_keys",
    "audit": "regionvault.core.cli.audit:audit",
    "tag": "regionvault.core.cli.tick:tag",
    "tick": "regionvault.core.cli.tick:tick",
    "run": "regionvault.core.cli.tick:run",
    "demo": "regionvault.plugins.samplenf.demo:demo",
    "worker": "regionvault.plugins.celery.worker:worker",
    "lock": "regionvault.core.cli.locks:lock",
    "hold": "regionvault.core.cli.locks:hold",
    "release": "regionvault.core.cli.locks:release",
    "forget": "regionvault.core.cli.locks:forget",
    "ls": "regionvault.core.cli.browse:ls",
    "find": "regionvault.core.cli.browse:find",
    "diff": "regionvault.core.cli.browse:diff",
    "retain": "regionvault.core.cli.browse:retain",
}

#: ``install(distribution, {module: source}, {command: "module:object"})``
Install = Callable[[str, dict[str, str], dict[str, str]], Path]

#: an outside plugin's command module: it uses the site as a built-in command does
HELLO = '''
import click
from regionvault.core.cli import CliState, pass_state


@click.command()
@click.option("--greeting", default="hello")
@pass_state
def hello(state: CliState, greeting: str) -> None:
    """Greet every region of the site (a plugin's command)."""
    for region in state.site().regions:
        click.echo(f"{greeting} from {region.name}")


def not_a_command() -> None:
    """A plain function: an entry point naming it is a mistake."""
'''


@pytest.fixture(autouse=True)
def _no_site_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGIONVAULT_SITE", raising=False)


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """A distribution that is not regionvault, found on sys.path by its dist-info alone (as
    pip leaves it), with modules and ``regionvault.cli`` entry points."""
    site_packages = tmp_path / "site-packages"
    site_packages.mkdir()
    modules: list[str] = []

    def _install(dist: str, sources: dict[str, str], commands: dict[str, str]) -> Path:
        for module, source in sources.items():
            (site_packages / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            modules.append(module)
        info = site_packages / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8"
        )
        lines = "".join(f"{name} = {target}\n" for name, target in commands.items())
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}", encoding="utf-8")
        monkeypatch.syspath_prepend(str(site_packages))  # also invalidates metadata caches
        return site_packages

    yield _install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    ok("init")
    return tmp_path / "site.toml"


def one_line_error(result: Result, *words: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regionvault: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def help_rows(result: Result) -> dict[str, str]:
    """The ``Commands:`` section of ``--help`` as {name: short help}."""
    assert result.exit_code == 0, result.stderr
    section = result.stdout.split("Commands:\n", 1)[1]
    rows: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        if line.startswith("   "):  # a long help text wrapped onto the next line
            rows[name] += " " + line.strip()
            continue
        name, _, text = line.strip().partition(" ")
        rows[name] = text.strip()
    return rows


# --------------------------------------------------------------------------- the built-ins


def test_every_built_in_command_is_an_entry_point_of_regionvault() -> None:
    """The root group defines no command itself; each built-in (and the demo, which lives
    in plugins/samplenf) is declared in the group and loads to the command of that name."""
    dist = importlib.metadata.distribution("regionvault")
    declared = {ep.name: ep.value for ep in dist.entry_points if ep.group == GROUP}
    assert declared == BUILT_IN
    assert cli.commands == {}
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(BUILT_IN)
    for name in BUILT_IN:
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name


def test_the_commands_doc_names_every_built_in_command_and_its_module() -> None:
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[2]
        for line in (ROOT / "docs" / "commands.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| `regionvault.")
    }
    for name, target in BUILT_IN.items():
        module = target.partition(":")[0]
        assert f"`{name}`" in rows.get(module, ""), (name, module)


def test_the_core_never_names_a_plugin() -> None:
    """Not in an import, not in a string: plugins reach the core through entry points."""
    mentions = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "core").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "regionvault.plugins" in line or "samplenf" in line
    ]
    assert mentions == []


def test_a_command_imports_its_own_module_and_help_imports_no_engine(tmp_path: Path) -> None:
    """Commands are looked up lazily: ``backup --help`` imports the backup commands and no
    other's; the root ``--help`` lists every command without the engine or the data plane."""
    code = textwrap.dedent(
        """
        import json, sys
        from regionvault.core.cli import main

        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
        print(json.dumps(sorted(m for m in sys.modules if m.startswith("regionvault."))))
        """
    )

    def loaded(*argv: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=True,
        )
        return set(json.loads(done.stdout.splitlines()[-1]))

    backup_help = loaded("backup", "--help")
    assert "regionvault.core.cli.backup" in backup_help
    others = {"site", "copy", "maintenance", "tick"}
    assert not {f"regionvault.core.cli.{m}" for m in others} & backup_help
    assert "regionvault.plugins.samplenf.demo" not in backup_help

    root_help = loaded("--help")
    assert {f"regionvault.core.cli.{m}" for m in others} <= root_help
    assert not any(
        m.startswith(("regionvault.core.pipeline", "regionvault.core.repository"))
        for m in root_help
    ), root_help


# --------------------------------------------------------------------------- a plugin's command


def test_a_plugin_command_appears_in_help_and_runs(install: Install, site_file: Path) -> None:
    install("rv-hello", {"rv_hello_cli": HELLO}, {"hello": "rv_hello_cli:hello"})
    rows = help_rows(ok("--help"))
    assert rows["hello"] == "Greet every region of the site (a plugin's command)."
    assert set(BUILT_IN) < set(rows)
    assert ok("hello", "--help").stdout.startswith("Usage: cli hello [OPTIONS]")
    result = ok("hello", "--greeting", "hi")
    assert result.stdout.splitlines() == ["hi from local:east", "hi from local:west"]
    # a site error inside the plugin's command is the same one line as in a built-in
    one_line_error(run("--site", site_file.parent / "nope.toml", "hello"), "nope.toml")


def test_the_console_script_runs_a_plugin_command(install: Install, site_file: Path) -> None:
    site_packages = install("rv-hello", {"rv_hello_cli": HELLO}, {"hello": "rv_hello_cli:hello"})
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_packages), env.get("PYTHONPATH")]))

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *args],
            cwd=site_file.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    listed = script("--help")
    assert listed.returncode == 0, listed.stderr
    assert "  hello " in listed.stdout and "  backup " in listed.stdout
    ran = script("hello")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["hello from local:east", "hello from local:west"]


def test_the_documented_plugin_command_works_as_written(install: Install, site_file: Path) -> None:
    """docs/commands.md's example module and entry point, installed as they are written."""
    text = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
    section = text.split("## A command of your own", 1)[1]
    module = section.split("```python\n", 1)[1].split("```", 1)[0]
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    commands = tomllib.loads(toml)["project"]["entry-points"][GROUP]
    assert commands == {"greet": "rv_greet:greet"}
    install("rv-greet", {"rv_greet": module}, commands)
    assert help_rows(ok("--help"))["greet"] == "Greet every region of the site."
    assert json.loads(ok("greet", "--json", "--greeting", "hi").stdout) == [
        {"region": "local:east", "says": "hi from local:east"},
        {"region": "local:west", "says": "hi from local:west"},
    ]
    assert ok("greet").stdout.splitlines() == [
        "local:east\thello from local:east",
        "local:west\thello from local:west",
    ]


# --------------------------------------------------------------------------- failures to load


@pytest.mark.parametrize(
    ("sources", "target", "reason", "summary"),
    [
        (
            {},
            "rv_nowhere_cli:hello",
            "ModuleNotFoundError: No module named 'rv_nowhere_cli'",
            "ModuleNotFoundError loading rv_nowhere_cli:hello",
        ),
        (
            {"rv_raises_cli": "raise RuntimeError('needs\\nlibfoo')\n"},
            "rv_raises_cli:hello",
            "RuntimeError: needs libfoo",
            "RuntimeError loading rv_raises_cli:hello",
        ),
        (
            {"rv_hello_cli": HELLO},
            "rv_hello_cli:missing",
            "AttributeError",
            "AttributeError loading rv_hello_cli:missing",
        ),
        (
            {"rv_hello_cli": HELLO},
            "rv_hello_cli:not_a_command",
            "rv_hello_cli:not_a_command is a function, not a click command",
            "rv_hello_cli:not_a_command is not a click command",
        ),
        (
            # a plugin that exits while imported must not end --help (silently, exit 0)
            {"rv_exits_cli": "import sys\nsys.exit(0)\n"},
            "rv_exits_cli:hello",
            "SystemExit: 0",
            "SystemExit loading rv_exits_cli:hello",
        ),
    ],
    ids=["missing-module", "module-raises", "missing-object", "not-a-command", "module-exits"],
)
def test_a_command_that_does_not_load_is_one_line_naming_its_entry_point(
    install: Install,
    site_file: Path,
    sources: dict[str, str],
    target: str,
    reason: str,
    summary: str,
) -> None:
    install("rv-broken", sources, {"hello": target})
    origin = f"hello = {target} (rv-broken 1.0)"
    for args in (["hello"], ["hello", "--greeting", "x"], ["hello", "--help"]):
        one_line_error(run(*args), "command 'hello' cannot be loaded", origin, GROUP, reason)
    # --help still lists everything, the broken command with why it is unavailable
    rows = help_rows(ok("--help"))
    assert rows["hello"] == f"(unavailable: {summary})"
    assert set(BUILT_IN) < set(rows)
    # and every other command works
    assert "local:east" in ok("regions").stdout


# --------------------------------------------------------------------------- name clashes


def test_a_plugin_claiming_a_built_in_name_is_ignored_and_named_never_an_override(
    install: Install, site_file: Path
) -> None:
    # no installed package can take a built-in command away (restore, mid-incident) nor
    # replace it: the built-in runs, and the plugin's claim is named in one warning line
    install("rv-usurper", {"rv_hello_cli": HELLO}, {"regions": "rv_hello_cli:hello"})
    result = run("regions")
    assert result.exit_code == 0, result.stderr
    assert "local:east" in result.stdout and "hello from" not in result.stdout
    (line,) = result.stderr.splitlines()
    assert line.startswith("regionvault: warning: command 'regions' of ")
    assert "regions = rv_hello_cli:hello (rv-usurper 1.0)" in line
    assert "regionvault's own command of that name runs" in line
    # the plugin's module was not even imported, and --help lists the built-in's own help
    assert "rv_hello_cli" not in sys.modules
    assert help_rows(ok("--help"))["regions"].startswith("List regions")


def test_two_plugins_claiming_one_name_is_an_error(install: Install, site_file: Path) -> None:
    install("rv-first", {"rv_hello_cli": HELLO}, {"hello": "rv_hello_cli:hello"})
    install("rv-second", {}, {"hello": "rv_other_cli:hello"})
    one_line_error(
        run("hello"),
        "command 'hello' is claimed 2 times",
        "hello = rv_hello_cli:hello (rv-first 1.0)",
        "hello = rv_other_cli:hello (rv-second 1.0)",
    )


def test_a_command_added_in_code_is_held_to_the_same_rule_as_an_entry_point() -> None:
    """An embedder's own root group may add commands in code; one named like a built-in is
    ignored and named, as a plugin's is."""

    @click.group(cls=RegionVaultGroup)
    def embedded() -> None:
        """An embedder's command line."""

    @click.command("regions")
    def my_regions() -> None:
        """Mine."""
        click.echo("ran my regions")

    @click.command("mine")
    def mine() -> None:
        """Mine too."""
        click.echo("ran mine")

    embedded.add_command(my_regions)
    embedded.add_command(mine)
    runner = CliRunner()
    assert runner.invoke(embedded, ["mine"]).stdout == "ran mine\n"
    shadowed = runner.invoke(embedded, ["regions", "--help"])
    assert shadowed.exit_code == 0, shadowed.stderr
    assert "ran my regions" not in shadowed.stdout and "List regions" in shadowed.stdout
    (line,) = shadowed.stderr.splitlines()
    assert line.startswith("regionvault: warning: command 'regions' of ")
    assert (
        f"{__name__}.test_a_command_added_in_code_is_held_to_the_same_rule_as_an_entry_point"
        ".<locals>.my_regions (added with add_command) is ignored"
    ) in line
