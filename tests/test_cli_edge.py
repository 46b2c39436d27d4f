"""The CLI for people, part 3 (issue #20, items 6 and 7), through the installed console
script: instances terminate/remove, global options on either side of the subcommand,
conflicting options, hints that name the likely mistake, names wherever ids go, shell
completion, and summaries that count what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from regionvault.core.cli.root import hoist_global_options
from regionvault.core.site import Site

#: the console script pip installed next to this interpreter
CONSOLE_SCRIPT = Path(sys.executable).parent / "regionvault"

Script = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def rv(lab: Path) -> Script:
    """The console script run in ``lab``, with no site from the environment unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGIONVAULT_", "_REGION"))}

    def script(*args: str | Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONSOLE_SCRIPT), *map(str, args)],
            cwd=lab,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return script


@pytest.fixture
def site_toml(lab: Path, rv: Script) -> Path:
    done = rv("init")
    assert done.returncode == 0, done.stderr
    return lab / "site.toml"


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout.splitlines()[-1] if result.stdout else ""


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [
        line for line in result.stderr.splitlines() if line.startswith(("regionvault:", "Error:"))
    ]
    assert len(lines) == 1, result.stderr
    return lines[0]


def add(rv: Script, lab: Path, name: str, *extra: str, region: str = "east") -> str:
    data = lab / f"{name}-data"
    data.mkdir()
    (data / "state").write_text(f"{name} state\n")
    return ok(rv("instances", "add", "-r", region, "-n", name, "--data", data, *extra))


def backed_up_and_copied(rv: Script, lab: Path) -> tuple[str, str, str]:
    """An instance ``nf`` in east (its function a long sleep), its point and its copy in west."""
    instance = add(rv, lab, "nf", "--command", "sleep 300")
    point = ok(rv("backup", "nf"))
    copy = ok(rv("copy", point, "--to", "west"))
    return instance, point, copy


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


# --------------------------------------------------------------------------- instances


def test_terminate_stops_what_restore_launched_and_remove_forgets_a_registration(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    instance, _, copy = backed_up_and_copied(rv, lab)
    launched = ok(rv("restore", copy, "-r", "west", "--launch", "--name", "nf-west"))
    record = lab / "regions/west/compute/instances" / launched / "instance.json"
    pid = json.loads(record.read_text())["pid"]
    assert pid_alive(pid)

    # a launched instance is not forgotten while it runs: remove says to terminate it
    refused = one_line_error(rv("instances", "remove", "nf-west"))
    assert "terminate it" in refused and launched in refused
    assert pid_alive(pid)

    assert ok(rv("instances", "terminate", "nf-west", "--region", "west")) == launched
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    assert not (lab / "regions/west/compute/instances" / launched / "data").exists()
    listed = json.loads(ok_out(rv("instances", "--json")))
    assert [i["name"] for i in listed] == ["nf"]
    assert ok(rv("instances", "terminate", launched)) == launched  # again: nothing to do

    # remove forgets the registration: the data directory and the points stay
    assert ok(rv("instances", "remove", "nf")) == instance
    assert json.loads(ok_out(rv("instances", "--json"))) == []
    assert (lab / "nf-data" / "state").read_text() == "nf state\n"
    assert len(json.loads(ok_out(rv("points", "--json")))) == 2
    gone = one_line_error(rv("instances", "terminate", "nf"))
    assert "'nf'" in gone


def ok_out(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


# --------------------------------------------------------------------------- global options


def test_global_options_before_or_after_the_subcommand(lab: Path, rv: Script) -> None:
    elsewhere = lab / "elsewhere" / "site.toml"
    ok(rv("--site", elsewhere, "init"))
    before = ok_out(rv("--site", elsewhere, "regions", "--json"))
    after = ok_out(rv("regions", "--json", "--site", elsewhere))
    assert json.loads(before) == json.loads(after)
    assert [r["id"] for r in json.loads(after)] == ["local:east", "local:west"]
    # without it there is no site here: the option after the subcommand really was taken
    assert "site.toml" in one_line_error(rv("regions"))
    # into a group's subcommand, in the --opt=value form, and the metrics directory
    metrics = lab / "metrics"
    data = lab / "d"
    data.mkdir()
    added = rv(
        "instances", "add", "-r", "east", "-n", "a", "--data", data,
        f"--site={elsewhere}", "--metrics-dir", metrics,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert (metrics / "regionvault.prom").is_file()
    listed = json.loads(ok_out(rv("instances", "--json", "--site", elsewhere)))
    assert [i["name"] for i in listed] == ["a"]


def _toy_group() -> click.Group:
    @click.group()
    @click.option("--site")
    @click.option("-v", "--verbose", count=True)
    def root(site: str | None, verbose: int) -> None:
        pass

    @root.command()
    @click.option("--name")
    @click.option("-x", is_flag=True)
    @click.argument("rest", nargs=-1)
    def sub(name: str | None, x: bool, rest: tuple[str, ...]) -> None:
        pass

    return root


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["sub", "--site", "s"], ["--site", "s", "sub"]),
        (["--site", "a", "sub", "--site=b"], ["--site", "a", "--site=b", "sub"]),
        (["sub", "-vv", "-x", "-v"], ["-vv", "-v", "sub", "-x"]),
        # a value of the subcommand's own option is never taken for a global option
        (["sub", "--name", "--site", "r"], ["sub", "--name", "--site", "r"]),
        # nor anything after --
        (["sub", "--", "--site", "s"], ["sub", "--", "--site", "s"]),
        (["nosuch", "--site", "s"], ["nosuch", "--site", "s"]),
    ],
)
def test_hoisting_knows_the_commands_own_options(argv: list[str], expected: list[str]) -> None:
    group = _toy_group()
    with click.Context(group) as ctx:
        assert hoist_global_options(group, ctx, argv) == expected


# --------------------------------------------------------------------------- usage errors


def test_conflicting_restore_options_are_refused_in_one_line(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    add(rv, lab, "nf")
    point = ok(rv("backup", "nf"))
    both = one_line_error(rv("restore", point, "-r", "east", "--target", lab / "t", "--launch"), 2)
    assert "--target and --launch cannot be used together" in both
    named = one_line_error(
        rv("restore", point, "-r", "east", "--target", lab / "t", "--name", "x"), 2
    )
    assert "--target and --name" in named
    assert not (lab / "t").exists()


def test_wrong_region_is_a_usage_error_naming_the_known_regions(
    site_toml: Path, rv: Script
) -> None:
    for argv in (
        ["points", "-r", "south"],
        ["instances", "--region", "south"],
        ["tag", "-r", "south"],
    ):
        line = one_line_error(rv(*argv), 2)
        assert "unknown region 'south'; known regions: local:east, local:west" in line
        assert "site.toml" not in line


# --------------------------------------------------------------------------- hints


def test_point_hints_name_the_likely_mistake(lab: Path, site_toml: Path, rv: Script) -> None:
    _, point, copy = backed_up_and_copied(rv, lab)
    target = lab / "t"
    short = one_line_error(rv("restore", point[:3], "-r", "east", "--target", target))
    assert f"prefix {point[:3]!r} is too short: give at least 6 characters" in short
    # a point of east asked in west: its copy there is named
    wrong = one_line_error(rv("restore", point[:8], "-r", "west", "--target", target))
    assert f"this is a point of local:east; its copy in local:west is {copy[:12]}" in wrong
    # and the copy asked in east: the original there is named
    back = one_line_error(rv("restore", copy[:8], "-r", "east", "--target", target))
    assert f"this is a copy in local:west of {point[:12]}, which local:east holds" in back
    assert not target.exists()


def test_points_takes_an_instance_name(lab: Path, site_toml: Path, rv: Script) -> None:
    instance = add(rv, lab, "nf")
    add(rv, lab, "other")
    point = ok(rv("backup", "nf"))
    ok(rv("backup", "other"))
    for ref in ("nf", instance):
        listed = json.loads(ok_out(rv("points", "--instance", ref, "--json")))
        assert [p["id"] for p in listed] == [point]


def test_a_hint_names_no_option_the_command_lacks(lab: Path, site_toml: Path, rv: Script) -> None:
    add(rv, lab, "nf")
    point = ok(rv("backup", "nf"))
    ok(rv("backup", add(rv, lab, "other", region="west")))  # west has a repository
    # copy names the source region with --from, not --region: the hint names the region only
    wrong = one_line_error(rv("copy", point[:8], "--from", "west", "--to", "east"))
    assert "--region" not in wrong, wrong
    assert (
        f"no recovery point {point[:8]!r} in local:west: this is a point of local:east, and "
        "local:west holds no copy of it (name local:east as its region, or copy it to "
        "local:west first)"
    ) in wrong


def test_points_refuses_a_name_of_several_instances_as_backup_does(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    east = add(rv, lab, "nf")
    data = lab / "west-nf-data"
    data.mkdir()
    (data / "state").write_text("west's nf\n")
    west = ok(rv("instances", "add", "-r", "west", "-n", "nf", "--data", data))
    east_point = ok(rv("backup", east))
    ok(rv("copy", east_point, "--to", "west"))
    west_point = ok(rv("backup", west))
    refused = one_line_error(rv("backup", "nf"))
    assert "'nf' matches 2 instances" in refused
    # west holds points of both nf (its own, and the copy of east's): refused there too
    for where in ([], ["--region", "west"]):
        listed = one_line_error(rv("points", "--instance", "nf", *where))
        assert "'nf' matches 2 instances" in listed and "give the id" in listed
        assert east in listed and west in listed
    # one instance's points by its id; a name of one instance among the listed points
    by_id = json.loads(ok_out(rv("points", "--instance", west, "--json")))
    assert [p["id"] for p in by_id] == [west_point]
    in_east = json.loads(ok_out(rv("points", "--instance", "nf", "--region", "east", "--json")))
    assert [p["id"] for p in in_east] == [east_point]


def test_shell_completion_of_commands_regions_instances_and_points(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    add(rv, lab, "nf")
    point = ok(rv("backup", "nf"))

    def complete(*words: str) -> list[str]:
        line = ["regionvault", *words]
        done = rv(
            _REGIONVAULT_COMPLETE="bash_complete",
            COMP_WORDS=" ".join(line),
            COMP_CWORD=str(len(line) - 1),
        )
        assert done.returncode == 0, done.stderr
        return [row.split(",", 1)[1] for row in done.stdout.splitlines() if row]

    assert "instances" in complete("inst")
    assert complete("instances", "t") == ["terminate"]
    assert complete("points", "--region", "") == ["local:east", "local:west", "east", "west"]
    assert complete("backup", "n") == ["nf"]
    assert complete("restore", point[:2]) == [point]
    # the site's option after the subcommand is the one completion reads
    assert complete("points", "--site", "nosuch.toml", "--region", "") == []


# --------------------------------------------------------------------------- item 7


def test_tick_prints_a_failed_backup_once_and_counts_it(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    add(rv, lab, "gone")
    (lab / "gone-data" / "state").unlink()
    (lab / "gone-data").rmdir()
    ticked = rv("tick")
    assert ticked.returncode == 1
    both = ticked.stdout + ticked.stderr
    assert both.count("data directory") == 1, both
    assert "tick: done 4, incomplete 0, failed 1, busy 0, stopped 0" in ticked.stdout


def test_instances_add_warns_about_a_tag_the_tagger_rejects(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    added = rv(
        "instances", "add", "-r", "east", "-n", "fruit", "--data", lab, "--tag", "backup=banana"
    )
    assert added.returncode == 0
    instance = added.stdout.splitlines()[-1]
    warning = [line for line in added.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "backup='banana'" in warning[0], added.stderr
    assert [i["id"] for i in json.loads(ok_out(rv("instances", "--json")))] == [instance]
    (east, _) = json.loads(ok_out(rv("tag", "--json")))
    assert (len(east["skipped"]), len(east["malformed"])) == (0, 1)
    summary = ok_out(rv("tag", "-r", "east")).splitlines()[0]
    assert summary == "local:east: tagged 0, skipped 0, malformed 1, failed 0"


def test_copying_a_copy_home_answers_with_the_original(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    _, point, copy = backed_up_and_copied(rv, lab)
    home = rv("copy", copy, "--to", "east")
    assert ok(home) == point
    assert f"its original there is {point}" in home.stderr
    ids = sorted(p["id"] for p in json.loads(ok_out(rv("points", "--json"))))
    assert ids == sorted([point, copy])


def test_verify_json_is_a_document_even_without_a_repository(site_toml: Path, rv: Script) -> None:
    for argv in (["verify", "--json"], ["verify", "--json", "-r", "west"]):
        done = rv(*argv)
        assert done.returncode == 1
        rows = json.loads(done.stdout)
        assert all(r["repository"] is False and r["points"] == 0 for r in rows)
        assert [r["region"] for r in rows] == (
            ["local:west"] if "-r" in argv else ["local:east", "local:west"]
        )
        assert done.stderr.startswith("regionvault: error: ")


def test_an_ambiguous_prefix_lists_the_points_it_matches(site: Site, tmp_path: Path) -> None:
    from regionvault.core.errors import RegionVaultError
    from regionvault.core.pipeline import Engine

    data = tmp_path / "d"
    data.mkdir()
    (data / "f").write_text("x")
    east = site.region("east")
    inst = east.compute.register_instance("nf", data)
    engine = Engine(site)
    first = engine.backup(inst.id)
    (data / "f").write_text("y")
    second = engine.backup(inst.id, slot=first.created_at.replace(year=first.created_at.year + 1))
    points = {first.id: first, second.id: second}
    # ids are random: the branch is reached with the points a shared prefix would match
    line = engine._point_hint("abcdef", list(points.values()), "local:east")
    assert line.startswith("recovery point 'abcdef' is ambiguous in local:east: it matches 2")
    assert all(p[:12] in line for p in points) and line.endswith("give more characters")
    with pytest.raises(RegionVaultError, match=r"no recovery point 'ffffffffff' in local:east$"):
        engine.find_point("ffffffffff", "local:east")


def test_jobs_lists_the_ledgers_history_with_how_long_each_took(
    lab: Path, site_toml: Path, rv: Script
) -> None:
    add(rv, lab, "nf")
    assert rv("tick").returncode == 0
    history = json.loads(rv("jobs", "--json").stdout)
    kinds = {j["kind"] for j in history}
    assert {"tag", "backup", "copy", "retention"} <= kinds, kinds
    assert all(j["outcome"] for j in history)
    assert json.loads(rv("jobs", "-n", "2", "--json").stdout) == history[:2]
    assert json.loads(rv("status", "--jobs", "2", "--json").stdout) == history[:2]
    table = rv("jobs")
    assert table.returncode == 0 and "Traceback" not in table.stderr
    (backup,) = [line for line in table.stdout.splitlines() if "\tbackup\t" in line]
    took = backup.split("\t")[4]
    assert took != "-" and took[0].isdigit(), backup
    assert rv("jobs", "-n", "0").returncode == 2
