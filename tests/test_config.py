"Integration tests for the config contract: the CLI's --print-config and its one-line errors."
import json, subprocess, sys
from pathlib import Path

import pytest, yaml

ROOT = Path(__file__).resolve().parent.parent

def run(*args, cwd=None):
    return subprocess.run(["opd-distill", *args], capture_output=True, text=True, cwd=cwd, timeout=300)

def test_print_config_tiny(tmp_path):
    r = run("--stage", "tiny", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    body = "\n".join(l for l in r.stdout.splitlines() if not l.startswith("#"))
    cfg = yaml.safe_load(body)
    assert cfg["stage"] == "tiny" and cfg["model"]["teacher"] == "random:tiny"
    assert not (tmp_path / "outputs").exists(), "--print-config must not write anything"

def test_print_config_override_and_config_file(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("stage: pilot\ntrain: {lr: 2.0e-5}\n")
    r = run("--config", str(f), "--set", "train.max_steps=7", "--print-config", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert (cfg["stage"], cfg["train"]["lr"], cfg["train"]["max_steps"]) == ("pilot", 2e-5, 7)

BAD = [
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.lr=0"], "train.lr"),
    (["--set", "train.max_steps=0"], "train.max_steps"),
    (["--set", "train.batch_size=four"], "train.batch_size"),
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["--set", "model.resolution=500"], "model.resolution"),
    (["--set", "distill.noise_level=0"], "distill.noise_level"),
    (["--set", "distill.mode=reverse_kl"], "distill.mode"),
    (["--stage", "huge"], "stage='huge'"),
    (["--config", "missing.yaml"], "no such file"),
]

@pytest.mark.parametrize("args,expect", BAD)
def test_bad_input_one_line_exit_2(tmp_path, args, expect):
    r = run(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2
    assert expect in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs").exists()

def test_invalid_yaml(tmp_path):
    f = tmp_path / "bad.yaml"; f.write_text("train: {lr: [1,\n")
    r = run("--config", str(f), cwd=tmp_path)
    assert r.returncode == 2 and "invalid YAML" in r.stderr and r.stderr.count("\n") == 1

def test_readme_matches_index():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_sidebar_lists_every_notebook():
    side = yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())
    def walk(items):
        for it in items:
            if isinstance(it, str): yield it
            else: yield from walk(it.get("contents", []))
    listed = set(walk(side["website"]["sidebar"]["contents"]))
    assert listed == {p.name for p in (ROOT / "nbs").glob("*.ipynb")}

def test_parameters_tag_survives_clean():
    "papermill needs the `parameters` tag; nbdev-clean must keep it (allowed_cell_metadata_keys)."
    import tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["nbdev"]
    assert cfg["allowed_cell_metadata_keys"] == ["tags"] and set(cfg["tst_flags"].split()) == {"notest", "slow", "gpu"}

def test_run_identity_is_what_shapes_the_student(tmp_path):
    "An eval/qualtrics fix after training reopens the same run (same id, same resume key); a training change does not."
    def head(*extra):
        r = run("--stage", "pilot", *extra, "--print-config", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()[0]                  # "# stage=pilot run_id=pilot-xxxxxxxx config_hash=…"
    assert head("--set", "eval.clip_weights=/data/clip.bin", "--set", "qualtrics.max_questions=5") == head()   # the repro
    from opd.config import config_hash, load_config, run_id
    pilot = load_config("pilot")
    assert run_id(load_config("pilot", overrides=["eval.n_prompts=10"])) == run_id(pilot)
    assert config_hash(load_config("pilot", overrides=["train.lr=3e-5"])) != config_hash(pilot)
