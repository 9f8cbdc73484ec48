"""What the batch command checks and writes before and around Ray, without a cluster: every path of the batch
before Ray starts, the results file written whole lines at a time, and a results line for every job when the batch
ends before its jobs could run (an unreachable cluster, SIGTERM while the workers load)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from latentsync import InputError, ResourceError
from latentsync.batch import cluster as cluster_mod
from latentsync.batch import command as command_mod
from latentsync.batch import driver as driver_mod
from latentsync.batch.jobs import Results, check_results, read_jobs
from latentsync.preflight import check_output


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Inputs that exist (the checks before Ray look at paths, not at media), with the cwd in their folder."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.mp4", "b.mp4", "a.wav", "b.wav"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def _jobs(folder, *entries: dict) -> os.PathLike:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_no_output_is_a_file_the_batch_reads_or_writes_through_links_and_dots(files):
    (files / "link.mp4").symlink_to(files / "a.mp4")
    os.link(files / "b.mp4", files / "hard.mp4")
    jobs = _jobs(files,
                 {"video": "a.mp4", "audio": "a.wav", "output": "o1.mp4"},                 # 1 good
                 {"video": "b.mp4", "audio": "b.wav", "output": "./sub/../a.mp4"},         # 2 line 1's video
                 {"video": "b.mp4", "audio": "b.wav", "output": "link.mp4"},               # 3 a link to it
                 {"video": "a.mp4", "audio": "a.wav", "output": "hard.mp4"},               # 4 a hard link to b.mp4
                 {"video": "b.mp4", "audio": "b.wav", "output": str(files / "o1.mp4")},    # 5 line 1's output
                 {"video": "b.mp4", "audio": "b.wav", "output": "./results.mp4"},          # 6 --results
                 {"video": "b.mp4", "audio": "b.wav", "output": "o2.mp4"})                 # 7 good
    (files / "jobs.mp4").symlink_to(jobs)
    jobs.write_text(jobs.read_text() + json.dumps({"video": "a.mp4", "audio": "b.wav", "output": "jobs.mp4"}) + "\n")
    good, bad = read_jobs(jobs, results=files / "results.mp4")
    assert [j.line for j in good] == [1, 7], "the good jobs still run"
    errors = {r["line"]: r["error"] for r in bad}
    assert sorted(errors) == [2, 3, 4, 5, 6, 8]
    assert "is also the video of line 1" in errors[2] and "never overwrites its inputs" in errors[2]
    assert "is also the video of line 1" in errors[3]
    assert "is also the video of line 2" in errors[4]  # hard.mp4 is b.mp4, first read by line 2
    assert "is also the output of line 1" in errors[5]
    assert "is also the results file (--results)" in errors[6]
    assert "is also the jobs file" in errors[8]
    assert all(r["status"] == "failed" and "\n" not in r["error"] for r in bad)


def test_output_folders_get_the_clis_own_messages_on_their_line(files):
    (files / "out").mkdir()
    (files / "afile").write_text("x")
    outputs = ["out", "x/", "afile/deeper/o.mp4", "noext", "a.mp4"]
    jobs = _jobs(files, *({"video": "a.mp4", "audio": "a.wav", "output": o} for o in outputs),
                 {"video": "missing.mp4", "audio": "a.wav", "output": "o.mp4"})
    good, bad = read_jobs(jobs)
    assert good == []
    errors = {r["line"]: r["error"] for r in bad}
    for line, output in enumerate(outputs, start=1):
        with pytest.raises(InputError) as cli:
            check_output(output, inputs=(files / "a.mp4", files / "a.wav"))
        assert errors[line] == str(cli.value), f"line {line} ({output}) is not told what the CLI says"
    assert errors[6] == "video missing.mp4 does not exist"


def test_the_results_path_is_checked_before_anything_is_written(files):
    jobs = _jobs(files, {"video": "a.mp4", "audio": "a.wav", "output": "o1.mp4"})
    before = jobs.read_text()
    for bad, message in (("jobs.jsonl", "is the jobs file"), ("./a.wav", "is the audio of line 1"),
                         ("sub/../a.mp4", "is the video of line 1")):
        with pytest.raises(InputError, match=message):
            read_jobs(jobs, results=check_results(bad))
    for bad, message in (("res/", "names a folder"), (".", "names a folder"),
                         ("afile/r.jsonl", "afile is a file, not a folder")):
        (files / "afile").write_text("x")
        with pytest.raises(InputError, match=message):
            check_results(bad)
    assert jobs.read_text() == before and not (files / "o1.mp4").exists()
    # Through the command: exit status 2 and one line, before Ray and the models.
    assert command_mod.main([str(jobs), "--results", "jobs.jsonl", "-q"]) == 2
    assert jobs.read_text() == before


def test_a_results_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    with Results(path) as results:
        results.add({"line": 1, "status": "succeeded"})
        real = os.write
        monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[: len(data) // 2]))  # the disk fills up
        with pytest.raises(ResourceError, match="cannot write the results file"):
            results.add({"line": 2, "status": "failed", "error": "x" * 100})
        monkeypatch.setattr(os, "write", real)
        results.add({"line": 3, "status": "skipped"})
    assert [json.loads(line)["line"] for line in path.read_text().splitlines()] == [1, 3]
    assert path.read_text().endswith("\n")


def _command(files, *flags: str) -> tuple[int, list[dict]]:
    jobs = _jobs(files, *({"video": "a.mp4", "audio": "a.wav", "output": f"o{i}.mp4"} for i in range(3)),
                 {"video": "nope.mp4", "audio": "a.wav", "output": "o9.mp4"})
    status = command_mod.main([str(jobs), "--results", "results.jsonl", "-q", *flags])
    return status, [json.loads(line) for line in (files / "results.jsonl").read_text().splitlines()]


def test_an_unreachable_address_gives_every_job_its_line(files, capsys, caplog):
    status, lines = _command(files, "--address", "127.0.0.1:9")
    assert status == 1
    assert sorted(r["line"] for r in lines) == [1, 2, 3, 4]
    assert {r["status"] for r in lines} == {"failed"}
    assert all(r["error"].startswith("no Ray cluster answers at 127.0.0.1:9") for r in lines if r["line"] != 4)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no Ray cluster answers" in errors[0], "the reason is said once"
    assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == [
        "line 4 failed: video nope.mp4 does not exist"], "the reason is not repeated for every job"


def test_sigterm_while_the_workers_load_gives_every_job_its_line(files, monkeypatch, capsys):
    class Loading:  # the workers are still loading their models when SIGTERM comes
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

    from contextlib import contextmanager

    @contextmanager
    def connect(address, stop=None, *, verbose=False):
        with stop.handling():
            yield False

    monkeypatch.setattr(cluster_mod, "connect", connect)
    monkeypatch.setattr(cluster_mod, "plan_workers", lambda workers, device: (1, {"num_cpus": 1}))
    monkeypatch.setattr(driver_mod, "Batch", Loading)
    started = time.monotonic()
    status, lines = _command(files)
    assert status == 143 and time.monotonic() - started < 20
    assert sorted(r["line"] for r in lines) == [1, 2, 3, 4]
    assert [r["error"] for r in lines if r["line"] != 4] == ["interrupted (Ctrl-C or SIGTERM) before it finished"] * 3


def test_a_byte_order_mark_is_no_part_of_line_one_and_a_line_not_utf8_fails_alone(files):
    jobs = files / "jobs.jsonl"
    good = json.dumps({"video": "a.mp4", "audio": "a.wav", "output": "o1.mp4"}).encode()
    latin1 = b'{"video": "caf\xe9.mp4", "audio": "a.wav", "output": "o2.mp4"}'  # a Latin-1 editor's line
    jobs.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + latin1 + b"\n" + good.replace(b"o1", b"o3") + b"\n")
    ok, bad = read_jobs(jobs)
    assert [j.line for j in ok] == [1, 3]
    assert bad == [{"line": 2, "video": None, "output": None, "status": "failed", "seed": None, "frames": None,
                    "seconds": None, "sync": None, "ranges": None,
                    "error": "line 2 is not UTF-8 text (byte 0xe9 at column 15); save the jobs file as UTF-8"}]


def test_paths_that_are_not_utf8_work_as_the_os_gives_them(files, capsys):
    folder = files / os.fsdecode(b"caf\xe9")  # a name the OS holds as bytes that are not UTF-8
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"x")
    jobs = _jobs(folder, {"video": str(folder / "a.mp4"), "audio": "a.wav", "output": str(folder / "o.mp4")})
    results = folder / os.fsdecode(b"r\xe9sults.jsonl")
    assert command_mod.main([str(jobs), "--results", str(results), "-q", "--address", "127.0.0.1:9"]) == 1
    [line] = [json.loads(text) for text in results.read_text(errors="surrogateescape").splitlines()]
    assert line["video"] == str(folder / "a.mp4") and line["error"].startswith("no Ray cluster answers")


@pytest.mark.parametrize("value", ["inf", "1e20", "nan", "0", "-1"])
def test_a_placement_timeout_out_of_range_is_refused_in_one_line(files, capsys, value):
    jobs = _jobs(files, {"video": "a.mp4", "audio": "a.wav", "output": "o1.mp4"})
    assert command_mod.main([str(jobs), "--results", "results.jsonl", "-q", "--placement-timeout", value]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --placement-timeout must be more than 0 and at most 86400 seconds, got {float(value):g}"]
    assert not (files / "results.jsonl").exists()


def test_no_results_file_appears_before_its_first_line(tmp_path):
    path = tmp_path / "results.jsonl"
    with Results(path):
        pass  # a batch killed before any job ended
    assert not path.exists()
    path.write_text('{"line": 1}\n')  # an earlier run's results stay until this run has a line of its own
    with Results(path) as results:
        assert path.read_text() == '{"line": 1}\n'
        results.add({"line": 2})
    assert path.read_text() == '{"line": 2}\n'
