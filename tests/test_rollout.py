"`opd-build-teacher-dataset`: files, resumability (nothing duplicated), bad input."
import json, subprocess
from pathlib import Path

ARGS = ["--stage", "tiny", "--set", "prompts.n_prompts=12"]

def run(*a): return subprocess.run(["opd-build-teacher-dataset", *ARGS, *a], capture_output=True, text=True, timeout=600)

def test_build_and_resume(tmp_path):
    out = tmp_path / "run"
    r = run("--out", str(out), "--splits", "val,heldout", "--snapshots", "every:4")
    assert r.returncode == 0, r.stderr[-2000:]
    man = out / "teacher_dataset" / "manifest.jsonl"
    assert str(man) in r.stdout
    lines = [json.loads(l) for l in man.read_text().splitlines()]
    assert lines and all((out / "teacher_dataset" / l["image"]).is_file() and (out / "teacher_dataset" / l["latents"]).is_file() for l in lines)
    assert {l["split"] for l in lines} <= {"val", "heldout"}
    # a killed build: drop the last finished prompt, then resume
    man.write_text("".join(json.dumps(l) + "\n" for l in lines[:-1]))
    r = run("--out", str(out), "--splits", "val,heldout", "--snapshots", "every:4")
    assert r.returncode == 0, r.stderr[-2000:]
    again = [json.loads(l) for l in man.read_text().splitlines()]
    assert [l["prompt_id"] for l in again] == [l["prompt_id"] for l in lines], "resume adds exactly the missing prompt"

def test_bad_input(tmp_path):
    for args, field in ((["--snapshots", "sometimes"], "--snapshots"), (["--splits", "test"], "--splits")):
        r = run("--out", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and field in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "x").exists()
