"Integration tests for `opd-bench` and `opd-plan-memory` on the tiny stage (CPU, seconds): keys, sane numbers, one-line errors."
import json, math, os, subprocess
from pathlib import Path

import pytest

ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

def run(*args, timeout=600):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENV)

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    r = run("opd-bench", "--stage", "tiny", "--iters", "2", "--warmup", "1", "--grading-reps", "1", "--threads", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, json.loads((out / "bench.json").read_text())

def test_bench_writes_json_and_prints_paths(bench):
    out, r, _ = bench
    for f in ("bench.json", "bench.md", "config.yaml", "run.json", "prompts.jsonl"):
        assert (out / f).exists(), f
        assert str(out / f) in r.stdout, "the CLI ends by printing the paths it wrote"
    assert "**iteration**" in r.stdout and "teacher grading" in r.stdout       # the printed tables
    assert not (out / "text_cache").exists(), "the bench removes its text cache"

def test_bench_keys_and_sane_numbers(bench):
    _, _, b = bench
    assert {"device", "setup", "repro", "iteration", "pure", "overhead_ratio", "overhead", "memory", "grading", "compile",
            "peak_mem_mb", "targets", "met"} <= set(b)
    assert {"seed", "git_commit", "config_hash", "versions"} <= set(b["repro"])
    assert b["device"]["type"] == "cpu" and b["device"]["torch"] and b["device"]["diffusers"]
    s = b["setup"]
    assert (s["resolution"], s["batch_size"], s["K"], s["dtype"]) == (32, 4, 8, "float32")
    it = b["iteration"]
    for k in ("wall_s", "t_rollout", "t_grading", "t_backward", "t_optimizer", "samples_per_s"):
        assert math.isfinite(it[k]) and it[k] > 0, k
    assert it["wall_s"] >= 0.9 * (it["t_rollout"] + it["t_grading"] + it["t_backward"] + it["t_optimizer"])
    assert all(math.isfinite(b["pure"][k]) and b["pure"][k] > 0 for k in ("rollout_s", "grading_s", "backward_s", "optimizer_s", "total_s"))
    assert math.isfinite(b["overhead_ratio"]) and b["overhead_ratio"] > 0      # a ratio of wall times: printed, never judged
    assert set(b["overhead"]) == {"rollout", "grading", "backward", "optimizer"}
    assert b["peak_mem_mb"] > 0 and b["memory"]["kind"] == "rss"
    g = b["grading"]
    assert set(g) == {"b1", "b4"}
    assert g["b1"]["forwards_batched"] == 1 and g["b1"]["forwards_stepwise"] == 8
    assert all(v["speedup"] > 0 and v["max_abs_diff"] < 1e-3 for v in g.values())
    assert b["compile"]["skipped"].startswith("not requested")

def test_bench_bad_input_is_one_line(tmp_path):
    r = run("opd-bench", "--stage", "tiny", "--iters", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--iters" in lines[0], r.stderr

def test_plan_memory_final(tmp_path):
    r = run("opd-plan-memory", "--stage", "final", "--out", str(tmp_path / "plan"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FITS a 80 GiB GPU" in r.stdout
    for comp in ("teacher weights", "student weights", "AdamW states", "gradients", "activations", "text encoders"):
        assert comp in r.stdout, comp
    f = tmp_path / "plan" / "memory_plan.json"
    assert str(f) in r.stdout
    d = json.loads(f.read_text())
    assert d["fits"] and d["peak_phase"] == "backward" and 50 < d["peak_gib"] < 75
    assert abs(d["components_gib"]["AdamW states"] - 16.71) < 0.05          # 2 × fp32 × 2.243 B
    assert d["assumptions"]["teacher_params"] == 8_056_627_520

def test_plan_memory_does_not_fit_and_bad_input():
    r = run("opd-plan-memory", "--stage", "final", "--gpu-gb", "40", "--strict")
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout and "fits with: --set model.lora_rank=64" in r.stdout
    r = run("opd-plan-memory", "--stage", "final", "--gpu-gb", "-5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu-gb"), r.stderr


def test_bench_necessary_ratio_and_selective_grading(bench):
    "The second ratio (against the necessary work) and the comparison with grading every visited state."
    _, r, b = bench
    assert math.isfinite(b["necessary_ratio"]) and b["necessary_ratio"] > 0 and b["seconds_per_sample"] > 0
    f = b["full_grading"]
    assert b["iteration"]["teacher_states"] == 4 * 7 and f["teacher_states"] == 4 * 8      # trained states vs every visited state
    assert f["necessary_ratio"] > 0 and f["selective_speedup"] > 0 and f["configured_wall_s"] > 0
    assert "ratio (necessary work)" in r.stdout

def test_plan_time_and_gpus(tmp_path):
    "opd-plan: memory and time on a named GPU into memory_plan.json; opd-plan-memory is the same command."
    r = run("opd-plan", "--stage", "final", "--gpu", "h100", "--gpus", "2", "--out", str(tmp_path / "plan"))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "plan" / "memory_plan.json").read_text())
    assert d["gpu_gib"] == 79.1 and d["time"]["n_gpus"] == 2 and d["time"]["gpu"] == "h100"
    assert 0 < d["seconds_per_sample"] < d["seconds_per_iteration"] and d["gpu_hours"] > 0
    assert "s per on-policy sample" in r.stdout and "GPU-hours" in r.stdout
    for bad, flag in ((["--gpu", "v100"], "--gpu"), (["--gpus", "0"], "--gpus")):
        r = run("opd-plan-memory", "--stage", "final", *bad, "--out", str(tmp_path / "bad"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and flag in lines[0], r.stderr
    assert not (tmp_path / "bad").exists()
