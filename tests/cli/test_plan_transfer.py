"""`sfxflow plan` and `sfxflow transfer` through the real command-line entry point."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from sfxflow.cli import main

TABLE2_ARGS = ["plan", "--tib", "15.5", "--files", "3303", "--core-seconds-per-gb", "5691.2",
               "--measured-on", "c3.8xlarge", "--instances", "c3.8xlarge,c4.8xlarge,m4.10xlarge",
               "--nodes", "16,32,64", "--spread-cv", "0.2", "--bandwidth-gbit", "1.33",
               "--upload-gbit", "2.0", "--s3-price", "0.03"]


def _rows(out: str) -> dict[tuple[str, int], list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 7 and parts[1].isdigit():
            rows[(parts[0], int(parts[1]))] = parts[2:]
    return rows


def test_plan_prints_table2_shape_and_reproduces_the_report(capsys) -> None:
    assert main(TABLE2_ARGS) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 9
    mean_s = float(rows[("c3.8xlarge", 64)][0].replace(",", ""))
    assert mean_s == pytest.approx(47_390, rel=0.01)
    assert float(rows[("c4.8xlarge", 32)][4]) == pytest.approx(0.864, rel=0.01)  # TiB/h
    assert "TiB/h" in out
    assert "18.9 h" in out and "$476.16 per month" in out


def test_plan_from_summary_json_frames_and_blocks(tmp_path: Path, capsys) -> None:
    summary = {"frames": 500, "hits": 50, "hit_rate": 0.1, "core_seconds_per_frame": 0.6,
               "bytes_per_frame": 4_594_560, "stage_seconds": {"spots": 200.0, "index": 100.0}}
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    args = ["plan", "--summary", str(path), "--frames", "2000000", "--block-frames", "1000",
            "--instances", "c7i.8xlarge", "--nodes", "8,64", "--schedule", "dynamic", "--json"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["n_nodes"] for r in rows] == [8, 64]
    assert rows[0]["n_units"] == 2000
    assert rows[0]["placeholder"] is True
    # 2e6 frames x 0.6 core-s / (32 vCPU x speed 1.8) / 8 nodes
    assert rows[0]["mean_s"] == pytest.approx(2e6 * 0.6 / (32 * 1.8) / 8, rel=0.01)
    # doubling the hit fraction adds the index share (1/3) once more
    assert main([*args, "--hit-fraction", "0.2"]) == 0
    more = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert more[0]["mean_s"] / rows[0]["mean_s"] == pytest.approx(4 / 3, rel=0.01)


def test_plan_downloads_at_the_instance_network_unless_data_is_local(capsys) -> None:
    # Fast compute makes a cloud run network-bound: 5 GB per unit at c4.8xlarge's 10 Gbit/s is
    # 4 s per unit, so 100 units on one node take at least 400 s; local data does not.
    base = ["plan", "--tb", "0.5", "--file-gb", "5", "--core-seconds-per-gb", "1",
            "--instances", "c4.8xlarge", "--nodes", "1", "--json"]
    assert main(base) == 0
    cloud = json.loads(capsys.readouterr().out.splitlines()[0])
    assert main([*base, "--data-local"]) == 0
    local = json.loads(capsys.readouterr().out.splitlines()[0])
    assert cloud["makespan_s"] == pytest.approx(100 * 5e9 * 8 / 10e9, rel=0.02)
    assert local["makespan_s"] < cloud["makespan_s"] / 10
    assert main([*base, "--bandwidth-gbit", "1.33"]) == 0
    slow = json.loads(capsys.readouterr().out.splitlines()[0])
    assert slow["makespan_s"] == pytest.approx(100 * 5e9 * 8 / 1.33e9, rel=0.02)


def test_plan_scaling_reaches_thousands_of_nodes(capsys) -> None:
    args = ["plan", "--tb", "50", "--core-seconds-per-frame", "0.8", "--bytes-per-frame", "4.6e6",
            "--file-gb", "1", "--scaling", "--instances", "c3.8xlarge", "--schedule", "dynamic",
            "--bandwidth-gbit", "2", "--spread", "0.1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert max(n for _, n in rows) == 2048
    rates = [float(rows[("c3.8xlarge", n)][2]) for n in (1, 2, 4, 8, 16, 32, 64)]
    assert all(b > 1.9 * a for a, b in itertools.pairwise(rates))  # ~linear here
    eff_2048 = float(rows[("c3.8xlarge", 2048)][3])
    assert eff_2048 < 0.95  # 50,000 units on 2,048 nodes: granularity shows


def test_plan_catalogue_override_and_price(tmp_path: Path, capsys) -> None:
    cat = tmp_path / "cat.toml"
    cat.write_text('[instance."lab"]\nvcpus = 64\nprice_per_hour = 1.0\n')
    args = ["plan", "--tb", "1", "--core-seconds-per-gb", "3600", "--catalogue", str(cat),
            "--instances", "lab,c7i.8xlarge", "--nodes", "1", "--price", "c7i.8xlarge=0.5",
            "--file-gb", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    # 1000 GB x 3600 core-s / 64 vCPU = 56,250 s = 15.625 h at $1/h
    assert float(rows[("lab", 1)][-1].replace(",", "")) == pytest.approx(15.62, abs=0.01)
    assert ("c7i.8xlarge", 1) in rows and "*" not in out.split("c7i.8xlarge")[1][:2]


@pytest.mark.parametrize("args,message", [
    (["plan", "--tb", "1"], "no per-frame cost"),
    (["plan", "--core-seconds-per-frame", "1"], "no data size"),
    (["plan", "--tb", "1", "--core-seconds-per-frame", "1", "--instances", "z9.huge"],
     "'z9.huge' is not in the catalogue"),
    (["plan", "--frames", "10", "--core-seconds-per-frame", "1"], "--frames needs bytes"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--catalogue", "/nonexistent.toml"],
     "/nonexistent.toml: cannot read the catalogue"),
    (["plan", "--tb", "1", "--summary", "/nonexistent/summary.json"], "/nonexistent/summary"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--spread-cv", "-1"],
     "--spread-cv '-1': expected a number from 0 to 10"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--spread", "-1"],  # the old name
     "--spread '-1': expected a number from 0 to 10"),
    (["plan", "--tb", "1e30", "--core-seconds-per-gb", "1"], "--tb '1e30': expected a number"),
    (["plan", "--frames", "1e20", "--bytes-per-frame", "1e6", "--core-seconds-per-gb", "1"],
     "--frames '1e20': expected an integer from 1 to"),
    (["plan", "--frames", "10000000000000", "--bytes-per-frame", "1e9",
      "--core-seconds-per-gb", "1"], "units of work"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--startup-s", "nan"],
     "--startup-s 'nan': expected a number from 0 to 86400"),
    (["plan", "--tb", "1", "--core-seconds-per-gb", "1", "--s3-usd-per-gib-month", "-1"],
     "--s3-usd-per-gib-month '-1'"),
    (["transfer", "a", "s3://b/c", "--part-size-mib", "nan"], "--part-size-mib 'nan'"),
    (["transfer", "a", "s3://b/c", "--part-size-mb", "inf"], "--part-size-mb 'inf'"),
])
def test_plan_user_errors_exit_2_with_one_line(args, message, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_plan_bad_summary_names_file_and_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"frames": 0, "core_seconds_per_frame": None}))
    assert main(["plan", "--tb", "1", "--summary", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "core_seconds_per_frame" in err


def test_plan_list(capsys) -> None:
    assert main(["plan", "--list"]) == 0
    out = capsys.readouterr().out
    assert "c3.8xlarge" in out and "hpc7a.96xlarge*" in out and "placeholder" in out


@pytest.mark.s3
def test_transfer_cli_upload_resume_download(tmp_path: Path, s3_server, s3_bucket,
                                             capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(2000 + i))
    (src / "empty.bin").write_bytes(b"")
    dest = f"s3://{s3_bucket}/p"
    base = ["transfer", "--endpoint-url", s3_server, "--streams", "3"]
    assert main([*base, str(src), dest]) == 0
    out = capsys.readouterr().out
    assert "4 file(s) sent" in out and "Gbit/s" in out
    assert main([*base, "--json", str(src), dest]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_sent"], report["n_skipped"]) == (0, 4)
    assert "testing" not in out  # the (dummy) credentials never appear
    restore = tmp_path / "restore"
    assert main([*base, "--json", f"{dest}/", str(restore)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_sent"], report["n_failed"], report["n_unverified"]) == (4, 0, 0)
    assert sorted(p.name for p in restore.iterdir()) == ["empty.bin", "f0.bin", "f1.bin", "f2.bin"]


@pytest.mark.s3
def test_transfer_cli_failure_exit_1(tmp_path: Path, s3_server, s3_bucket, capsys) -> None:
    out_dir = tmp_path / "o"
    assert main(["transfer", "--endpoint-url", s3_server, f"s3://{s3_bucket}/nothing/here",
                 str(out_dir)]) == 2
    assert "nothing listed" in capsys.readouterr().err
    assert main(["transfer", "only-one-path"]) == 2


@pytest.mark.s3
@pytest.mark.slow
def test_transfer_compare_awscli(tmp_path: Path, s3_server, s3_bucket, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(300_000))
    dest = f"s3://{s3_bucket}/bench"
    assert main(["transfer", "--endpoint-url", s3_server, "--compare-awscli", "--repeat", "2",
                 str(src), dest]) == 0
    out = capsys.readouterr().out
    assert "sfxflow transfer" in out and "aws s3 cp" in out and "ratio sfxflow / awscli" in out
    assert "round 1: sfxflow" in out and "round 2: sfxflow" in out and "0.001 GB" in out
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    assert not client.list_objects_v2(Bucket=s3_bucket).get("Contents")  # scratch removed


@pytest.mark.s3
def test_transfer_module_main_no_crc32(tmp_path: Path, s3_server, s3_bucket, capsys) -> None:
    """``python -m sfxflow.cli.transfer`` (what --compare-awscli times) runs the same command;
    --no-crc32 leaves S3's additional checksum out."""
    import boto3

    from sfxflow.cli import transfer as cli_transfer

    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(1000))
    assert cli_transfer.main(["--endpoint-url", s3_server, "--no-crc32", "--json", str(src),
                              f"s3://{s3_bucket}/n"]) == 0
    assert json.loads(capsys.readouterr().out)["n_sent"] == 1
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    head = client.head_object(Bucket=s3_bucket, Key="n/f.bin", ChecksumMode="ENABLED")
    assert not head.get("ChecksumCRC32") and head["Metadata"]["sha256"]
    assert cli_transfer.main(["only-one-path"]) == 2
    assert "expected SRC... DST" in capsys.readouterr().err


def test_progress_bar_draws_to_a_stream() -> None:
    import io

    from sfxflow.cli.transfer import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream, "upload")
    bar.start(3, 2_000_000_000)
    bar.add(1_000_000_000)
    bar.draw(force=True)
    assert " 50.0%" in stream.getvalue()
    bar.add(1_000_000_000)
    bar.close()
    text = stream.getvalue()
    assert "100.0%" in text and "3 files" in text and text.endswith("\n")


@pytest.mark.slow
def test_plan_from_a_real_process_run(shared_data: Path, tmp_path: Path, capsys) -> None:
    """End to end: `sfxflow process` on the two real CSPAD stills, then `sfxflow plan` reads its
    summary.json; the predicted node time follows the measured per-frame cost."""
    cbfs = sorted(str(p) for p in (shared_data / "lcls-cspad-thermolysin").glob("*.cbf"))
    run_dir = tmp_path / "run"
    assert main(["-q", "process", *cbfs, "--cell", "93 93 130.5 90 90 120", "--space-group",
                 "P6122", "--out", str(run_dir), "--workers", "1", "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    capsys.readouterr()
    assert main(["plan", "--summary", str(run_dir / "summary.json"), "--frames", "100000",
                 "--block-frames", "100", "--instances", "c3.8xlarge", "--nodes", "4",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    expected_s = 100_000 * summary["core_seconds_per_frame"] / 32 / 4
    assert row["mean_s"] == pytest.approx(expected_s, rel=0.01)
    assert row["total_bytes"] == pytest.approx(100_000 * summary["bytes_per_frame"])
