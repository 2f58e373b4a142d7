"""`opd-pipeline --preflight` and the automatic preflight of real runs, offline: the tiny stage passes and writes
nothing; missing weights, a too-small disk (patched free-space reading) and a too-small GPU (`--gpu-gb`) fail with a fix."""
import os, subprocess
from pathlib import Path

import pytest

from opd.config import OpdError, config_with, load_config
from opd.preflight import disk_plan, preflight

def run(*args, cwd, **env):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env))

def rows(stdout: str) -> dict:
    "The table's rows by check name: '✓' or '✗'."
    out = {}
    for line in stdout.splitlines():
        s = line.strip()
        if s[:1] in ("✓", "✗"): out[" ".join(s[1:].split()[:2]) if s[1:].split()[0] in ("GPU", "run", "HF") else s[1:].split()[0]] = s[0]
    return out

def test_tiny_passes_offline_and_writes_nothing(tmp_path):
    r = run("opd-pipeline", "--stage", "tiny", "--preflight", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert set(rows(r.stdout).values()) == {"✓"} and {"teacher", "student", "CLIP", "GPU memory", "disk", "run folder"} <= set(rows(r.stdout))
    assert "all checks passed" in r.stdout and not (tmp_path / "run").exists()

def test_final_offline_uncached_small_gpu_exit_2(tmp_path):
    r = run("opd-pipeline", "--stage", "final", "--preflight", "--gpu-gb", "24", "--out", str(tmp_path / "run"), cwd=tmp_path,
            HF_HOME=str(tmp_path / "empty-hf-home"))
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: preflight:") and "\n" not in err, err
    got = rows(r.stdout)
    assert all(got[k] == "✗" for k in ("teacher", "student", "CLIP", "GPU memory")), r.stdout
    assert r.stdout.count("fix: ") >= 4 and "hf download stabilityai/stable-diffusion-3.5-large" in r.stdout
    assert not (tmp_path / "run").exists()

def test_too_little_disk_and_missing_local_weights(tmp_path):
    tiny = load_config("tiny")
    pf = preflight(tiny, tmp_path / "run", free_bytes=lambda p: 1000)          # a patched free-space reading
    assert [c.name for c in pf.failed] == ["disk"] and "keep_checkpoints" in pf.failed[0].fix and "1e-06 GB free" in pf.failed[0].detail
    pf = preflight(config_with(tiny, **{"model.teacher": str(tmp_path / "no-such-model")}), tmp_path / "run")
    teacher = next(c for c in pf.checks if c.name == "teacher")
    assert not teacher.ok and "no such folder" in teacher.detail and teacher.fix

def test_disk_prediction_full_ft_vs_lora():
    full = disk_plan(load_config("final")).set_index("item")["bytes"]
    assert round(full["checkpoints"] / 3 / 1e9, 1) == 26.9                 # Medium: 2.24 B params × (4 fp32 + 8 AdamW) bytes
    lora = disk_plan(load_config("final", overrides=["model.lora_rank=64"])).set_index("item")["bytes"]
    assert lora["checkpoints"] < full["checkpoints"] / 2 and lora["final student"] < full["final student"] / 50

def test_real_run_stops_before_its_first_step(tmp_path):
    from opd.pipeline import run_pipeline
    with pytest.raises(OpdError, match="preflight: .*GPU memory"):
        run_pipeline(load_config("pilot"), tmp_path / "pilot", gpu_gb=1, log=lambda s: None)
    assert not (tmp_path / "pilot").exists()

def test_no_automatic_preflight_when_nothing_left_loads_weights(tmp_path):
    "A finished real run whose evaluation is current (e.g. re-exporting the survey on a laptop) needs no weights, so no preflight."
    import json
    from opd.config import eval_key
    from opd.pipeline import STEPS, _loads_weights
    cfg, rd = load_config("pilot"), tmp_path / "run"
    rd.mkdir()
    steps = {n: {"done": True, "outputs": []} for n in STEPS} | {"eval": {"done": True, "outputs": [], "key": eval_key(cfg)}}
    (rd / "pipeline.json").write_text(json.dumps({"steps": steps}))
    assert _loads_weights(cfg, rd, list(STEPS)) == []
    assert _loads_weights(config_with(cfg, **{"eval.n_prompts": 3}), rd, list(STEPS)) == ["eval"]
    assert _loads_weights(cfg, rd, list(STEPS), force="distill") == ["distill", "eval"]
    assert _loads_weights(cfg, tmp_path / "new", list(STEPS)) == ["text_cache", "teacher_dataset", "distill", "eval"]
