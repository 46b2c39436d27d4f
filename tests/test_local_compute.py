"""The local Compute against the Compute contract: registering, listing with tag filters and
pages, tags, file capture, restore sinks, launching a command and terminating it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest
from regionvault.core import (
    AmbiguousName,
    CaptureKind,
    ComputeError,
    EntryProblem,
    FileCapture,
    FileKind,
    Instance,
    InstanceNotFound,
    IssueKind,
    LaunchSpec,
    Region,
    Tags,
    UnsupportedOperation,
)
from regionvault.providers.local import LocalCompute, LocalFileSink, LocalProvider


def make_data(path: Path) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "config").write_text("mode = vcu\n")
    (path / "state.db").write_bytes(b"\x00\x01" * 1000)
    return path


def wait_for(condition: object, what: str, limit: float = 15.0) -> None:
    """Poll ``condition`` (a callable) until true; bounded, never asserts on time taken."""
    deadline = time.monotonic() + limit
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line[stat_line.rfind(")") + 2] != "Z"


# --------------------------------------------------------------------------- registering


def test_register_adopts_a_directory_in_place(east: Region, tmp_path: Path) -> None:
    data = make_data(tmp_path / "vcu-data")
    inst = east.compute.register_instance(
        "vcu-1", data, function="run-vcu --config etc/config", tags={"backup": "1-7"}
    )
    assert re.fullmatch(r"i-[0-9a-f]{16}", inst.id)
    assert (inst.name, inst.region, inst.state) == ("vcu-1", "local:east", "running")
    assert inst.function == "run-vcu --config etc/config"
    assert inst.tags == {"backup": "1-7"}
    assert inst.capture_kinds == {CaptureKind.FILES}
    assert inst.extra["data_dir"] == str(data.resolve())
    assert inst.extra["pid"] is None
    assert east.compute.get_instance(inst.id) == inst
    assert (data / "etc" / "config").read_text() == "mode = vcu\n"  # data stays put


def test_register_refuses_duplicates_and_bad_input(east: Region, tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    first = east.compute.register_instance("core", data)
    with pytest.raises(AmbiguousName, match=f"'core' already exists \\({first.id}\\)"):
        east.compute.register_instance("core", data)
    with pytest.raises(ComputeError, match="not a directory"):
        east.compute.register_instance("other", tmp_path / "missing")
    for bad_name in ("", "  ", "a\nb", "x" * 256, "i-0123456789abcdef"):
        with pytest.raises(ComputeError, match="instance name"):
            east.compute.register_instance(bad_name, data)
    with pytest.raises(ComputeError, match="function"):
        east.compute.register_instance("ims", data, function="  ")


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"": "x"}, "tag key '' is empty"),
        ({"k" * 129: "x"}, "longer than 128"),
        ({"backup": "v" * 257}, "'backup': value is longer than 256"),
        ({"bad\tkey": "x"}, "non-printable"),
        ({"backup": "1-7\n"}, "non-printable"),
        ({"backup": 7}, "must be strings"),
        ({f"k{i}": "v" for i in range(51)}, "at most 50"),
    ],
)
def test_bad_tags_are_refused_by_name(
    east: Region, tmp_path: Path, tags: dict[str, str], message: str
) -> None:
    data = make_data(tmp_path / "d")
    with pytest.raises(ComputeError, match=re.escape(message)):
        east.compute.register_instance("x", data, tags=tags)
    inst = east.compute.register_instance("y", data)
    with pytest.raises(ComputeError, match=re.escape(message)):
        east.compute.set_tags(inst.id, tags)
    assert east.compute.get_instance(inst.id).tags == {}


def test_unknown_instances(east: Region) -> None:
    for ref in ("i-0000000000000000", "../../etc", "vcu"):
        with pytest.raises(InstanceNotFound):
            east.compute.get_instance(ref)
    with pytest.raises(InstanceNotFound):
        east.compute.terminate("i-0000000000000000")


# --------------------------------------------------------------------------- listing


def test_tag_filters(east: Region, tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    reg = east.compute.register_instance
    a = reg("a", data, tags={"backup": "1-7", "env": "prod"})
    b = reg("b", data, tags={"backup": "none"})
    c = reg("c", data, tags={"env": "prod"})
    reg("d", data)

    def names(filters: dict[str, str | None] | None) -> list[str]:
        return [i.name for i in east.compute.list_instances(tag_filters=filters)]

    assert names(None) == ["a", "b", "c", "d"]
    assert names({"backup": None}) == ["a", "b"]
    assert names({"backup": "1-7"}) == ["a"]
    assert names({"env": "prod", "backup": None}) == ["a"]
    assert names({"env": "prod"}) == ["a", "c"]
    assert names({"missing": None}) == []
    east.compute.remove_tags(a.id, ["backup"])
    assert names({"backup": None}) == ["b"]
    assert {b.id, c.id} < {i.id for i in east.compute.list_instances()}


def test_pagination_is_stable_and_complete(east: Region, tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    for i in range(7):
        east.compute.register_instance(f"node-{i}", data, tags={"backup": "1-7"})
    first = east.compute.list_instances_page(page_size=3)
    assert [i.name for i in first.instances] == ["node-0", "node-1", "node-2"]
    assert isinstance(first.next_token, str)
    # an instance added between pages does not shift what comes next
    east.compute.register_instance("node-00", data)
    second = east.compute.list_instances_page(page_size=3, page_token=first.next_token)
    assert [i.name for i in second.instances] == ["node-3", "node-4", "node-5"]
    third = east.compute.list_instances_page(page_size=3, page_token=second.next_token)
    assert [i.name for i in third.instances] == ["node-6"]
    assert third.next_token is None
    everything = [i.name for i in east.compute.list_instances(page_size=2)]
    assert everything == sorted(everything) and len(everything) == 8
    filtered = east.compute.list_instances_page(tag_filters={"backup": None}, page_size=7)
    assert len(filtered.instances) == 7 and filtered.next_token is None
    with pytest.raises(ComputeError, match="bad page token"):
        east.compute.list_instances_page(page_token="garbage!")
    with pytest.raises(ComputeError, match="page_size"):
        east.compute.list_instances_page(page_size=0)


def test_set_and_remove_tags(east: Region, tmp_path: Path) -> None:
    inst = east.compute.register_instance("x", make_data(tmp_path / "d"), tags={"a": "1"})
    assert east.compute.set_tags(inst.id, {"b": "2", "a": "3"}) == {"a": "3", "b": "2"}
    assert east.compute.remove_tags(inst.id, ["a", "absent"]) == {"b": "2"}
    assert east.compute.get_instance(inst.id).tags == {"b": "2"}
    with pytest.raises(ComputeError, match="list of tag keys"):
        east.compute.remove_tags(inst.id, "b")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- capture


def test_capture_lists_the_tree_parents_first(east: Region, tmp_path: Path) -> None:
    data = tmp_path / "d"
    (data / "b" / "inner").mkdir(parents=True)
    (data / "a.txt").write_text("alpha")
    (data / "b" / "inner" / "deep").write_bytes(b"\x00" * 10)
    (data / "b" / "z").write_text("zz")
    os.chmod(data / "b" / "z", 0o600)  # noqa: PTH101
    (data / "link").symlink_to("b/z")
    (data / "dangling").symlink_to("nowhere")
    os.mkfifo(data / "pipe")
    inst = east.compute.register_instance("x", data)

    with east.compute.capture(inst.id) as capture:
        assert isinstance(capture, FileCapture)
        assert capture.instance.id == inst.id
        entries = list(capture.entries())
        assert [e.path for e in entries] == [
            "a.txt",
            "b",
            "b/inner",
            "b/inner/deep",
            "b/z",
            "dangling",
            "link",
            "pipe",
        ]
        by_path = {e.path: e for e in entries}
        assert by_path["b"].kind is FileKind.DIR
        assert by_path["b/z"].kind is FileKind.FILE
        assert by_path["b/z"].mode == 0o600
        assert by_path["b/z"].size == 2
        assert by_path["b/z"].mtime_ns == (data / "b" / "z").stat().st_mtime_ns
        assert (by_path["link"].kind, by_path["link"].target) == (FileKind.SYMLINK, "b/z")
        assert by_path["dangling"].target == "nowhere"
        assert by_path["pipe"].kind is FileKind.FIFO
        assert capture.issues == []
        with capture.open(by_path["a.txt"]) as f:
            assert f.read() == b"alpha"
        with pytest.raises(ComputeError, match="not a regular file"):
            capture.open(by_path["link"])


def test_capture_walks_anew_counts_totals_and_goes_deep(east: Region, tmp_path: Path) -> None:
    data = tmp_path / "d"
    deep = data
    for _ in range(1200):  # deeper than the interpreter's recursion limit
        deep = deep / "n"
        deep.mkdir(parents=deep.parent == data)
    (deep / "bottom").write_bytes(b"b" * 7)
    (data / "top").write_bytes(b"t" * 100)
    os.mkfifo(data / "pipe")
    inst = east.compute.register_instance("x", data)

    try:
        with east.compute.capture(inst.id) as capture:
            assert isinstance(capture, FileCapture)
            assert capture.totals() == (2, 107)
            entries = list(capture.entries())
            assert len(entries) == 1200 + 3  # the directories, two files and the FIFO
            assert entries[-3].path.endswith("/n/bottom") and entries[-3].size == 7
            assert capture.issues == []
            # every call lists the tree anew: nothing is held between walks
            (data / "top2").write_bytes(b"u")
            assert [e.path for e in capture.entries()][-2:] == ["top", "top2"]
            assert capture.totals() == (3, 108)
    finally:
        # bottom up, without recursion: shutil.rmtree (and so pytest's clean-up of old base
        # directories) recurses once per level and would fail on this tree
        (deep / "bottom").unlink(missing_ok=True)
        while deep != data:
            deep.rmdir()
            deep = deep.parent


def test_capture_walk_passes_over_a_directory_removed_meanwhile(
    east: Region, tmp_path: Path
) -> None:
    data = tmp_path / "d"
    (data / "a" / "inner").mkdir(parents=True)
    (data / "a" / "inner" / "f").write_text("f")
    (data / "b").write_text("b")
    inst = east.compute.register_instance("x", data)
    with east.compute.capture(inst.id) as capture:
        assert isinstance(capture, FileCapture)
        walk = capture.entries()
        first = next(walk)
        assert (first.path, first.kind) == ("a", FileKind.DIR)
        shutil.rmtree(data / "a")  # a workload removes it before the walk goes in
        assert [e.path for e in walk] == ["b"]


def test_capture_opens_only_the_file_it_walked(east: Region, tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "app.log").write_text("line 1\n")
    (data / "db").write_text("v1")
    (data / "gone").write_text("g")
    (data / "same").write_text("s")
    inst = east.compute.register_instance("x", data)
    capture = east.compute.capture(inst.id)
    assert isinstance(capture, FileCapture)
    entries = {e.path: e for e in capture.entries()}
    with capture.open(entries["same"]) as f:
        assert f.read() == b"s"
    with (data / "app.log").open("a") as f:
        f.write("line 2, after the capture\n")
    # a grown file is not cut to its old size (a version that never existed): it changed
    with pytest.raises(EntryProblem, match="changed since it was walked") as grown:
        capture.open(entries["app.log"])
    assert grown.value.issue == IssueKind.CHANGED
    new = data / "db.tmp"
    new.write_text("v2")
    new.replace(data / "db")  # how editors and config tools save: same size, new file
    with pytest.raises(EntryProblem, match="another inode") as replaced:
        capture.open(entries["db"])
    assert replaced.value.issue == IssueKind.CHANGED
    (data / "gone").unlink()
    with pytest.raises(EntryProblem, match="removed") as vanished:
        capture.open(entries["gone"])
    assert vanished.value.issue == IssueKind.VANISHED
    (data / "same").unlink()
    os.mkfifo(data / "same")  # a FIFO in its place: refused at once, not waited on
    with pytest.raises(EntryProblem, match="no longer a regular file"):
        capture.open(entries["same"])
    now = capture.restat(entries["app.log"])
    assert now is not None and now.size == len("line 1\nline 2, after the capture\n")
    assert now.identity is not None and now.identity[:2] == (entries["app.log"].identity or ())[:2]
    assert capture.restat(entries["gone"]) is None
    capture.close()


def test_a_walk_failing_in_a_directory_leaks_no_descriptor(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d"
    (data / "a").mkdir(parents=True)
    (data / "a" / "f").write_text("f")
    inst = east.compute.register_instance("x", data)
    capture = east.compute.capture(inst.id)
    assert isinstance(capture, FileCapture)
    inner = (data / "a").stat().st_ino
    real_listdir = os.listdir

    def listdir(path: object = ".") -> list[str]:
        if isinstance(path, int) and os.fstat(path).st_ino == inner:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))  # fatal: the run fails
        return real_listdir(path)  # type: ignore[call-overload, no-any-return]

    before = sorted(real_listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(ComputeError, match="Too many open files"):
        list(capture.entries())
    monkeypatch.undo()
    assert sorted(real_listdir("/proc/self/fd")) == before
    capture.close()


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_capture_never_opens_for_reading_what_is_put_in_a_files_place(
    east: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A tape rewinds when it is opened, a FIFO's writer wakes: a node put in a file's place
    is examined without being opened for reading."""
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    data = tmp_path / "d"
    data.mkdir()
    (data / "f").write_text("f")
    inst = east.compute.register_instance("x", data)
    capture = east.compute.capture(inst.id)
    assert isinstance(capture, FileCapture)
    (entry,) = capture.entries()
    (data / "f").unlink()
    if kind == "fifo":
        os.mkfifo(data / "f")
    else:
        os.mknod(data / "f", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    opened_for_reading: list[int] = []
    real_open = os.open

    def recording_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        fd = real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]
        if not flags & getattr(os, "O_PATH", 0):
            opened_for_reading.append(stat.S_IFMT(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    with pytest.raises(EntryProblem, match="no longer a regular file") as replaced:
        capture.open(entry)
    assert replaced.value.issue == IssueKind.CHANGED
    assert [m for m in opened_for_reading if m != stat.S_IFDIR] == []
    monkeypatch.undo()
    capture.close()


def test_capture_of_blocks_is_unsupported(east: Region, tmp_path: Path) -> None:
    inst = east.compute.register_instance("x", make_data(tmp_path / "d"))
    with pytest.raises(UnsupportedOperation, match="blocks"):
        east.compute.capture(inst.id, kind=CaptureKind.BLOCKS)
    with pytest.raises(UnsupportedOperation):
        east.compute.open_restore_sink(LaunchSpec("y"), CaptureKind.BLOCKS, size=4096)


# --------------------------------------------------------------------------- launch


def restore(region: Region, spec: LaunchSpec, files: dict[str, str]) -> LocalFileSink:
    sink = region.compute.open_restore_sink(spec, CaptureKind.FILES)
    assert isinstance(sink, LocalFileSink)
    for name, text in files.items():
        (sink.root / name).write_text(text)
    return sink


def test_launch_runs_the_function_in_the_data_directory(west: Region) -> None:
    spec = LaunchSpec(
        "vcu-restored",
        tags=Tags({"restored-from": "local:east"}),
        function='cat input > output; echo "$REGIONVAULT_DATA_DIR" > where; exec sleep 60',
    )
    sink = restore(west, spec, {"input": "restored bytes"})
    assert sink.root.is_dir()
    # a sink not launched yet is no instance
    assert [i.name for i in west.compute.list_instances()] == []

    inst = west.compute.launch(spec, sink)
    assert (inst.name, inst.state, inst.function) == ("vcu-restored", "running", spec.function)
    assert inst.tags == {"restored-from": "local:east"}
    assert inst.extra["data_dir"] == str(sink.root)
    pid = inst.extra["pid"]
    assert isinstance(pid, int)
    wait_for(lambda: (sink.root / "where").exists() and (sink.root / "output").exists(), "output")
    wait_for(lambda: (sink.root / "where").read_text().strip() != "", "where")
    assert (sink.root / "output").read_text() == "restored bytes"
    assert (sink.root / "where").read_text().strip() == str(sink.root)
    assert [i.id for i in west.compute.list_instances()] == [inst.id]

    west.compute.terminate(inst.id)
    assert not pid_alive(pid)
    assert west.compute.get_instance(inst.id).state == "terminated"
    assert list(west.compute.list_instances()) == []
    assert not sink.root.exists()  # restored data goes with the instance
    west.compute.terminate(inst.id)  # terminating twice is harmless


def test_terminate_kills_a_process_that_ignores_sigterm(west: Region) -> None:
    compute = LocalCompute(
        root=west.config.path("root"),
        provider="local",
        region=west.name,
        capabilities=LocalProvider.capabilities,
        terminate_timeout=0.3,
    )
    spec = LaunchSpec("stubborn", function="trap '' TERM; touch ready; while :; do sleep 1; done")
    sink = restore(west, spec, {})
    inst = compute.launch(spec, sink)
    wait_for(lambda: (sink.root / "ready").exists(), "the trap to be set")
    compute.terminate(inst.id)
    assert not pid_alive(inst.extra["pid"])
    assert compute.get_instance(inst.id).state == "terminated"


def test_an_exited_process_shows_as_stopped(west: Region) -> None:
    spec = LaunchSpec("oneshot", function="echo done; exit 0")
    inst = west.compute.launch(spec, restore(west, spec, {}))

    def stopped() -> bool:
        return west.compute.get_instance(inst.id).state == "stopped"

    wait_for(stopped, "the process to exit")
    assert Path(inst.extra["log"]).read_text() == "done\n"
    assert [i.state for i in west.compute.list_instances()] == ["stopped"]
    west.compute.terminate(inst.id)


def test_launch_without_function_and_launch_errors(west: Region, tmp_path: Path) -> None:
    spec = LaunchSpec("data-only")
    sink = restore(west, spec, {"f": "x"})
    inst = west.compute.launch(spec, sink)
    assert (inst.state, inst.extra["pid"]) == ("running", None)
    with pytest.raises(ComputeError, match="already launched"):
        west.compute.launch(spec, sink)
    with pytest.raises(AmbiguousName, match="data-only"):
        west.compute.launch(spec, restore(west, spec, {}))
    with pytest.raises(ComputeError, match="sink from this Compute"):
        west.compute.launch(LaunchSpec("other"), LocalFileSink(tmp_path, "i-0000000000000000"))
    west.compute.terminate(inst.id)


def test_discarding_a_sink_removes_its_data_and_record(west: Region) -> None:
    """A failed restore or launch discards its sink: the restored data and the pending
    record go, the sink cannot be launched from, and discarding again is harmless."""
    compute = west.compute
    assert isinstance(compute, LocalCompute)
    spec = LaunchSpec("never-launched", function="exec sleep 60")
    sink = restore(west, spec, {"restored.bin": "half a restore"})
    (sink.root / "sub").mkdir()
    (sink.root / "sub" / "more").write_text("x")
    instance_dir = compute.instances_dir / sink.instance_id
    assert instance_dir.is_dir()
    sink.discard()
    assert not instance_dir.exists()
    assert sorted(p.name for p in compute.instances_dir.iterdir()) == []
    with pytest.raises(ComputeError, match="discarded"):
        compute.launch(spec, sink)
    sink.discard()  # twice is harmless
    assert list(compute.list_instances()) == []


def test_discarding_a_launched_sink_keeps_the_instance_data(west: Region) -> None:
    """Once launched from, a sink's data belongs to the instance: discard leaves it, and
    terminate removes it."""
    spec = LaunchSpec("launched")
    sink = restore(west, spec, {"f": "kept"})
    inst = west.compute.launch(spec, sink)
    sink.discard()
    assert (sink.root / "f").read_text() == "kept"
    with pytest.raises(ComputeError, match="already launched"):
        west.compute.launch(spec, sink)
    assert west.compute.get_instance(inst.id).state == "running"
    west.compute.terminate(inst.id)
    assert not sink.root.exists()


def test_a_sink_made_by_hand_discards_nothing(west: Region, tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("not the provider's")
    LocalFileSink(tmp_path, "i-0000000000000000").discard()
    assert (tmp_path / "mine").read_text() == "not the provider's"


def test_terminating_a_registered_instance_keeps_its_data(east: Region, tmp_path: Path) -> None:
    data = make_data(tmp_path / "d")
    inst = east.compute.register_instance("x", data)
    east.compute.terminate(inst.id)
    assert (data / "etc" / "config").exists()
    with pytest.raises(ComputeError, match="terminated"):
        east.compute.set_tags(inst.id, {"a": "b"})
    # the name is free again
    assert east.compute.register_instance("x", data).id != inst.id


def test_instance_records_survive_a_new_compute(east: Region, tmp_path: Path) -> None:
    inst = east.compute.register_instance("x", make_data(tmp_path / "d"), tags={"k": "v"})
    fresh = LocalCompute(
        root=east.config.path("root"),
        provider="local",
        region=east.name,
        capabilities=LocalProvider.capabilities,
    )
    again: Instance = fresh.get_instance(inst.id)
    assert again == inst
    record = east.config.path("root") / "compute" / "instances" / inst.id / "instance.json"
    assert stat.S_ISREG(record.stat().st_mode)


def test_a_process_of_another_boot_or_pid_namespace_is_never_signalled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket
    import subprocess
    import sys

    from regionvault.core import procs
    from regionvault.core.errors import ComputeError
    from regionvault.core.procs import boot_id, pid_namespace, start_ticks
    from regionvault.providers.local import compute

    if boot_id() is None or pid_namespace() is None:
        pytest.skip("needs Linux's boot id and pid namespace")
    # a machine id of our own, so the rule is checked where there is no /etc/machine-id too
    monkeypatch.setattr(procs, "machine_tag", lambda: "5eed" * 4)
    # a live process standing for "the pid a record names": not launched by this provider
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        ticks = start_ticks(other.pid)
        here = {
            "pid_host": socket.gethostname(),
            "pid_boot": boot_id(),
            "pid_ns": pid_namespace(),
            "pid_machine": "5eed" * 4,
        }
        assert compute._alive(other.pid, ticks, here) is True
        # launched in an earlier boot of this machine: it ended with the boot, whoever has
        # the pid now; so did one of a record of an earlier version (no host, no machine)
        earlier = {**here, "pid_boot": "an-earlier-boot"}
        assert compute._alive(other.pid, ticks, earlier) is False
        legacy = {"pid_boot": "an-earlier-boot", "pid_ns": pid_namespace()}
        assert compute._alive(other.pid, ticks, legacy) is False
        # the rule is core/procs.py's: another boot of another machine (or another host, or
        # another pid namespace) cannot be told, and is never signalled
        for elsewhere in (
            {**earlier, "pid_machine": "0" * 16},
            {**here, "pid_host": "another-host"},
            {**here, "pid_ns": (pid_namespace() or 0) + 1},
        ):
            assert compute._alive(other.pid, ticks, elsewhere) is None, elsewhere
            with pytest.raises(ComputeError, match="another pid namespace, or on another host"):
                compute._stop(other.pid, ticks, 1.0, elsewhere)
        assert other.poll() is None  # still running: no signal reached it
    finally:
        other.kill()
        other.wait(timeout=30)
