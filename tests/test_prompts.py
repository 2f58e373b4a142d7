"Integration tests for `opd-generate-prompts`: the files it writes, and one-line errors that write nothing."
import json, subprocess
from pathlib import Path

import pytest

FIELDS = ["prompt_id", "prompt", "category", "seed", "split"]

def run(*args, cwd=None):
    return subprocess.run(["opd-generate-prompts", *args], capture_output=True, text=True, cwd=cwd, timeout=120)

def read_jsonl(p: Path):
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]

def test_tiny_writes_prompts_and_manifest(tmp_path):
    out = tmp_path / "run"
    r = run("--stage", "tiny", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / "prompts.jsonl"), str(out / "prompts_manifest.json")]
    recs = read_jsonl(out / "prompts.jsonl")
    man = json.loads((out / "prompts_manifest.json").read_text())
    run_json = json.loads((out / "run.json").read_text())
    assert len(recs) == man["n_prompts"] == 64
    assert all(list(x)[:5] == FIELDS for x in recs)
    assert len({x["prompt_id"] for x in recs}) == len({x["prompt"] for x in recs}) == 64
    assert len({x["category"] for x in recs}) >= 10
    assert {x["split"] for x in recs} == {"train", "val", "heldout"}
    assert {x["category"] for x in recs if x["split"] == "heldout"} == {"pets", "automotive"}
    assert man["config_hash"] == run_json["config_hash"] and man["seed"] == 0 and man["generator_version"]
    assert sum(man["split_counts"].values()) == 64
    assert sum(sum(c.values()) for c in man["category_counts"].values()) == 64
    # deterministic: a second directory gets byte-identical prompts; rerunning on the same one is a no-op
    r2 = run("--stage", "tiny", "--out", str(tmp_path / "run2"), cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "run2" / "prompts.jsonl").read_bytes() == (out / "prompts.jsonl").read_bytes()
    r3 = run("--stage", "tiny", "--out", str(out), cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr

def test_user_file_filled(tmp_path):
    f = tmp_path / "user.jsonl"
    f.write_text("".join(json.dumps({"prompt_id": f"u{i}", "prompt": f"Banner ad for sneaker {i}"}) + "\n" for i in range(20)))
    r = run("--stage", "tiny", "--set", f"prompts.path={f}", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(tmp_path / "run" / "prompts.jsonl")
    assert [x["prompt_id"] for x in recs] == [f"u{i}" for i in range(20)]
    assert {x["category"] for x in recs} == {"custom"} and all(isinstance(x["seed"], int) for x in recs)
    assert sum(x["split"] == "val" for x in recs) == 2

GOOD = '{"prompt_id": "a1", "prompt": "A red sneaker, copy space left"}'
BAD_FILES = [
    ([GOOD, '{"prompt_id": "a2", "prompt": }'], "line 2: invalid JSON"),
    ([GOOD, '{"prompt_id": "a2"}'], "line 2: missing field 'prompt'"),
    ([GOOD, GOOD], "line 2: duplicate prompt_id 'a1'"),
    ([GOOD, '{"prompt_id": "a2", "prompt": ""}'], "line 2: empty prompt"),
]

@pytest.mark.parametrize("lines,expect", BAD_FILES)
def test_bad_user_file_exit_2_nothing_written(tmp_path, lines, expect):
    f = tmp_path / "user.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = run("--stage", "tiny", "--set", f"prompts.path={f}", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert expect in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()

@pytest.mark.parametrize("setting,expect", [
    ("prompts.heldout_categories=[pet]", "prompts.heldout_categories='pet' is not allowed; allowed: fashion"),
    ("prompts.categories=[food,carz]", "prompts.categories='carz' is not allowed"),
])
def test_bad_category_names(tmp_path, setting, expect):
    r = run("--stage", "tiny", "--set", setting, cwd=tmp_path)
    assert r.returncode == 2 and expect in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "outputs").exists()

def test_existing_different_prompts_not_overwritten(tmp_path):
    out = tmp_path / "run"
    assert run("--stage", "tiny", "--out", str(out), cwd=tmp_path).returncode == 0
    before = (out / "prompts.jsonl").read_bytes()
    # the same run dir, same config, but its prompts.jsonl edited by hand: refuse to replace it
    (out / "prompts.jsonl").write_bytes(before.replace(b"fashion-0000", b"fashion-9999"))
    edited = (out / "prompts.jsonl").read_bytes()
    r = run("--stage", "tiny", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "already holds different prompts" in r.stderr and r.stderr.count("\n") == 1
    assert (out / "prompts.jsonl").read_bytes() == edited
