"""The first CLI commands end to end: init, regions, instances, instances add."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from cli_support import ok, run
from click.testing import Result
from regionvault.core.cli import cli, main, one_line, print_table, resolve_instance
from regionvault.core.cli.site import site_template
from regionvault.core.config import load_site, parse_site
from regionvault.core.errors import AmbiguousName, ConfigError, InstanceNotFound
from regionvault.core.plugins import get_plugin_manager
from regionvault.core.site import Site
from regionvault.core.types import RegionId

#: the console script pip installed next to this interpreter
CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"


@pytest.fixture
def workdir(empty_workdir: Path) -> Path:
    """Before ``regionvault init``: these tests run it themselves (tests/conftest.py)."""
    return empty_workdir


def assert_one_line_error(result: Result, *words: str) -> str:
    """Exit 1, nothing on stdout, one ``regionvault: error:`` line naming ``words``."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("regionvault: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def site_file(workdir: Path) -> Path:
    ok("init")
    return workdir / "site.toml"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "nf-data"
    data.mkdir()
    (data / "state.db").write_bytes(b"subscribers")
    return data


def add_instance(name: str, region: str, data: Path, *extra: str) -> str:
    result = ok("instances", "add", "--region", region, "--name", name, "--data", data, *extra)
    return result.stdout.splitlines()[-1]


# --------------------------------------------------------------------------- init


def test_init_writes_a_commented_site_that_parses_back(workdir: Path) -> None:
    result = ok("init")
    path = workdir / "site.toml"
    assert str(path.name) in result.stdout
    text = path.read_text(encoding="utf-8")
    assert text == site_template()
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 10  # a user can read what each key does

    site = parse_site(tomllib.loads(text), source=str(path), base_dir=workdir)
    assert sorted(site.regions) == ["local:east", "local:west"]
    assert site.destinations_of(RegionId("local", "east")) == (RegionId("local", "west"),)
    assert site.destinations_of(RegionId("local", "west")) == ()
    assert site.default_policy == "1-7"
    assert site.tag_key == "backup"
    assert site.tag_interval.total_seconds() == site.schedule_interval.total_seconds() == 300
    for name in ("east", "west"):
        assert site.regions[f"local:{name}"].path("root") == workdir / "regions" / name

    # and the whole site validates against the registered providers
    _, registry = get_plugin_manager()
    load_site(path, registry=registry)


def test_init_refuses_to_overwrite_without_force(workdir: Path) -> None:
    path = workdir / "site.toml"
    path.write_text("# mine\n", encoding="utf-8")
    assert_one_line_error(run("init"), "site.toml: already exists", "--force")
    assert path.read_text(encoding="utf-8") == "# mine\n"
    ok("init", "--force")
    assert path.read_text(encoding="utf-8") == site_template()


def test_init_into_a_directory_and_a_new_parent(workdir: Path) -> None:
    (workdir / "conf").mkdir()
    ok("init", "conf")
    assert (workdir / "conf" / "site.toml").is_file()
    ok("init", "deep/er/lab.toml")
    assert (workdir / "deep" / "er" / "lab.toml").is_file()


def test_init_without_path_follows_site_then_environment(workdir: Path) -> None:
    ok("--site", "flag.toml", "init")
    assert (workdir / "flag.toml").is_file()
    ok("init", env={"REGIONVAULT_SITE": str(workdir / "env.toml")})
    assert (workdir / "env.toml").is_file()
    assert not (workdir / "site.toml").exists()


# --------------------------------------------------------------------------- regions


def test_regions_plain_text_when_not_a_terminal(site_file: Path) -> None:
    lines = ok("regions").stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    assert [r[0] for r in rows] == ["local:east", "local:west"]
    east, west = rows
    assert east[1:4] == ["local", "local", "local"]
    caps = east[4].split()
    assert {"worm_lock", "legal_hold", "register_instance", "capture=files"} <= set(caps)
    assert east[5] == "local:west"
    assert west[5] == "-"


def test_regions_json(site_file: Path) -> None:
    data = json.loads(ok("regions", "--json").stdout)
    assert [r["id"] for r in data] == ["local:east", "local:west"]
    east = data[0]
    assert east["provider"] == "local"
    assert east["services"] == {"compute": "local", "keys": "local", "vault": "local"}
    assert east["capabilities"]["worm_lock"] is True
    assert east["capabilities"]["capture_kinds"] == ["files"]
    assert east["copies_to"] == ["local:west"]
    assert data[1]["copies_to"] == []


def test_table_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["REGION", "VAULT"], [["local:east", "local"]], tty=True)
    out = capsys.readouterr().out
    assert "REGION" in out and "VAULT" in out
    assert "local:east" in out
    assert "\t" not in out
    print_table(["REGION"], [], tty=True)
    assert capsys.readouterr().out == "(none)\n"


def test_plain_cells_escape_tabs_and_newlines(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["A", "B"], [["x\ty", "1\n2"]], tty=False)
    assert capsys.readouterr().out == "x\\ty\t1\\n2\n"


# --------------------------------------------------------------------------- instances


def test_instances_add_then_list(site_file: Path, data_dir: Path, workdir: Path) -> None:
    assert ok("instances").stdout == ""
    assert json.loads(ok("instances", "--json").stdout) == []

    result = ok(
        "instances",
        "add",
        "--region",
        "east",
        "--name",
        "vcu-1",
        "--data",
        data_dir,
        "--command",
        "python3 -m http.server",
        "--tag",
        "backup=1-7",
        "--tag",
        "role=vcu",
    )
    instance_id = result.stdout.splitlines()[-1]
    assert instance_id and instance_id == instance_id.strip() and " " not in instance_id
    assert "vcu-1" in result.stderr

    (row,) = [line.split("\t") for line in ok("instances").stdout.splitlines()]
    assert row == [instance_id, "vcu-1", "local:east", "running", "backup=1-7,role=vcu"]

    (listed,) = json.loads(ok("instances", "--json").stdout)
    assert listed["id"] == instance_id
    assert listed["name"] == "vcu-1"
    assert listed["region"] == "local:east"
    assert listed["tags"] == {"backup": "1-7", "role": "vcu"}
    assert listed["function"] == "python3 -m http.server"

    assert json.loads(ok("instances", "--region", "local:west", "--json").stdout) == []
    assert len(json.loads(ok("instances", "-r", "east", "--json").stdout)) == 1
    # the instance lives under the region's root, next to the site file
    assert (workdir / "regions" / "east").is_dir()


def test_instances_of_an_unknown_region(site_file: Path) -> None:
    result = run("instances", "--region", "north")
    assert result.exit_code == 2  # a usage error naming the known regions (issue #20)
    assert "unknown region 'north'; known regions: local:east, local:west" in result.stderr


@pytest.mark.parametrize("bad", ["novalue", "=x", " k=v"])
def test_instances_add_bad_tag_is_a_usage_error(site_file: Path, data_dir: Path, bad: str) -> None:
    result = run(
        "instances",
        "add",
        "-r",
        "east",
        "-n",
        "x",
        "--data",
        data_dir,
        "--tag",
        "a=b",
        "--tag",
        bad,
    )
    assert result.exit_code == 2
    assert repr(bad) in result.stderr
    assert "--tag" in result.stderr
    assert json.loads(ok("instances", "--json").stdout) == []


def test_instances_add_repeated_tag_key(site_file: Path, data_dir: Path) -> None:
    result = run(
        "instances",
        "add",
        "-r",
        "east",
        "-n",
        "x",
        "--data",
        data_dir,
        "--tag",
        "a=1",
        "--tag",
        "a=2",
    )
    assert result.exit_code == 2
    assert "'a' given twice" in result.stderr


def test_instances_add_needs_an_existing_directory(site_file: Path, workdir: Path) -> None:
    result = run("instances", "add", "-r", "east", "-n", "x", "--data", workdir / "missing")
    assert result.exit_code == 2
    assert "missing" in result.stderr


def test_instances_add_to_an_unknown_region(site_file: Path, data_dir: Path) -> None:
    result = run("instances", "add", "-r", "north", "-n", "x", "--data", data_dir)
    assert result.exit_code == 2
    assert "unknown region 'north'; known regions: local:east, local:west" in result.stderr


def test_instances_add_duplicate_name_is_an_expected_error(site_file: Path, data_dir: Path) -> None:
    add_instance("vdu", "east", data_dir)
    assert_one_line_error(
        run("instances", "add", "-r", "east", "-n", "vdu", "--data", data_dir), "vdu"
    )


def test_listing_options_before_add_are_refused(site_file: Path, data_dir: Path) -> None:
    result = run("instances", "--json", "add", "-r", "east", "-n", "x", "--data", data_dir)
    assert result.exit_code == 2
    assert "after 'add'" in result.stderr


# --------------------------------------------------------------------------- resolve_instance


def test_resolve_instance_by_id_name_and_region(site_file: Path, data_dir: Path) -> None:
    east_id = add_instance("core", "east", data_dir)
    west_id = add_instance("core", "west", data_dir)
    ims_id = add_instance("ims", "west", data_dir)
    with Site.load(site_file) as site:
        assert resolve_instance(site, east_id).region == "local:east"
        assert resolve_instance(site, west_id).id == west_id
        assert resolve_instance(site, "ims").id == ims_id
        assert resolve_instance(site, "ims", region="west").id == ims_id
        assert resolve_instance(site, "core", region="local:east").id == east_id
        assert resolve_instance(site, "core", region="west").id == west_id

        with pytest.raises(AmbiguousName) as info:
            resolve_instance(site, "core")
        message = str(info.value)
        assert east_id in message and west_id in message
        assert "local:east" in message and "local:west" in message

        with pytest.raises(InstanceNotFound, match="'nope'"):
            resolve_instance(site, "nope")
        with pytest.raises(InstanceNotFound, match=r"\[local:east\] no instance 'ims'"):
            resolve_instance(site, "ims", region="east")
        with pytest.raises(InstanceNotFound):
            resolve_instance(site, west_id, region="east")
        with pytest.raises(ConfigError, match="unknown region"):
            resolve_instance(site, "ims", region="north")


# --------------------------------------------------------------------------- errors and sites


def test_missing_site_file_is_one_line(workdir: Path) -> None:
    assert_one_line_error(run("regions"), "site.toml", "site file not found", "regionvault init")


def test_bad_site_file_names_file_and_key(workdir: Path) -> None:
    (workdir / "site.toml").write_text(
        '[regions."local:east"]\nroot = "r"\nrooot = "r"\n', encoding="utf-8"
    )
    assert_one_line_error(run("instances"), "site.toml", 'regions."local:east"', "rooot")


def test_invalid_toml_is_one_line(workdir: Path) -> None:
    (workdir / "site.toml").write_text("[regions\nx = 1\n", encoding="utf-8")
    assert_one_line_error(run("regions", "--json"), "site.toml", "invalid TOML")


def test_one_line_folds_line_breaks() -> None:
    assert one_line("a\n  b\r\nc \n") == "a b c"


def _site_named(path: Path, region: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[regions."local:{region}"]\nroot = "r-{region}"\n', encoding="utf-8")
    return path


def test_site_precedence_flag_then_environment_then_cwd(workdir: Path) -> None:
    _site_named(workdir / "site.toml", "cwd")
    env_site = _site_named(workdir / "e" / "env.toml", "env")
    flag_site = _site_named(workdir / "f" / "flag.toml", "flag")

    def ids(*args: str | Path, env: dict[str, str] | None = None) -> list[str]:
        return [r["id"] for r in json.loads(ok(*args, "regions", "--json", env=env).stdout)]

    assert ids() == ["local:cwd"]
    assert ids(env={"REGIONVAULT_SITE": str(env_site)}) == ["local:env"]
    assert ids("--site", flag_site, env={"REGIONVAULT_SITE": str(env_site)}) == ["local:flag"]
    assert ids("--site", flag_site) == ["local:flag"]


# --------------------------------------------------------------------------- help and main


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


def test_help_everywhere() -> None:
    commands = list(_all_commands(cli))
    assert {("init",), ("regions",), ("instances",), ("instances", "add")} <= set(commands)
    for path in [(), *commands]:
        for flag in ("--help", "-h"):
            result = ok(*path, flag)
            assert result.stdout.startswith("Usage: "), path
            assert "--help" in result.stdout


def test_main_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "Usage: regionvault" in capsys.readouterr().out


def test_only_the_process_entry_point_freezes_start_up_objects(
    site_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() (the console script) freezes what start-up made once the site is loaded; a
    command run inside another program (CliRunner here) leaves that program's objects to
    its collector, even after main() ran in the same process."""
    gc.unfreeze()
    try:
        ok("--site", site_file, "regions")
        assert gc.get_freeze_count() == 0
        with pytest.raises(SystemExit) as info:
            main(["--site", str(site_file), "regions"])
        assert info.value.code == 0
        assert "local:east" in capsys.readouterr().out
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        ok("--site", site_file, "regions")
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_unknown_command_is_a_usage_error() -> None:
    result = run("frobnicate")
    assert result.exit_code == 2
    assert "frobnicate" in result.stderr


# --------------------------------------------------------------------------- console script


def test_installed_console_script_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), f"no console script at {CONSOLE_SCRIPT}"
    site = tmp_path / "lab" / "site.toml"
    env = {k: v for k, v in os.environ.items() if k != "REGIONVAULT_SITE"}

    def script(*args: str | Path, **kw: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *map(str, args)],
            cwd=tmp_path,
            env={**env, **kw},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert script("--site", site, "init").returncode == 0
    added = script(
        "instances",
        "add",
        "-r",
        "east",
        "-n",
        "ims-1",
        "--data",
        data_dir,
        "--tag",
        "backup=1-7",
        REGIONVAULT_SITE=str(site),
    )
    assert added.returncode == 0, added.stderr
    instance_id = added.stdout.splitlines()[-1]

    listed = script("--site", site, "instances", "--json")
    assert listed.returncode == 0, listed.stderr
    (only,) = json.loads(listed.stdout)
    assert (only["id"], only["name"], only["tags"]) == (instance_id, "ims-1", {"backup": "1-7"})

    missing = script("--site", tmp_path / "nope.toml", "regions")
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("regionvault: error: ")
    assert "Traceback" not in missing.stderr

    usage = script("instances", "add", "--name", "x")
    assert usage.returncode == 2
    assert "Usage:" in usage.stderr
