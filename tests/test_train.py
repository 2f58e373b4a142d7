"Integration tests for `opd-distill`: reproducibility, exact resume after SIGKILL, multi-process launch, the papermill job."
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["--set", "train.max_steps=6", "--set", "train.checkpoint_every=2", "--set", "prompts.n_prompts=24"]
LOSSES = ("step", "total_loss", "kl_loss", "mse_loss", "lr", "grad_norm")

def distill(*args, **kw):
    return subprocess.run(["opd-distill", "--stage", "tiny", *STEPS, *args], capture_output=True, text=True, timeout=600, **kw)

def losses(run):
    rows = [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [tuple(r[k] for k in LOSSES) for r in rows]

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = distill("--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r

def test_run_writes_contract_files(reference):
    out, r = reference
    for f in ("config.yaml", "run.json", "prompts.jsonl", "metrics.jsonl", "metrics.csv", "train_summary.json", "student"):
        assert (out / f).exists(), f
        assert str(out / f) in r.stdout, "the CLI ends by printing the paths it wrote"
    keys = json.loads((out / "run.json").read_text())
    assert {"seed", "git_commit", "config_hash", "versions"} <= set(keys)
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert set(LOSSES) <= set(header) and {"t_rollout", "t_grading", "t_backward", "t_optimizer", "samples_per_s", "peak_mem_mb"} <= set(header)
    ms = losses(out)
    assert len(ms) == 6 and all(all(v == v and abs(v) != float("inf") for v in m) for m in ms)
    assert len(list((out / "checkpoints").glob("step-*"))) == 2, "keep the last 2 checkpoints"

def test_same_seed_same_metrics(reference, tmp_path):
    out, _ = reference
    r = distill("--out", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "again") == losses(out)

def test_sigkill_then_resume_is_exact(reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "killed"
    p = subprocess.Popen(["opd-distill", "--stage", "tiny", *STEPS, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step-000004").exists() and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert (run / "checkpoints" / "step-000002").exists() or (run / "checkpoints" / "step-000004").exists()
    r = distill("--out", str(run), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(ref)

def test_corrupt_checkpoint_falls_back(reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "corrupt"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "student"); (run / "train_summary.json").unlink()
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    victim = next(p for p in newest.iterdir() if p.suffix == ".safetensors")
    victim.write_bytes(b"garbage")
    r = distill("--out", str(run), "--resume", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back" in r.stderr
    assert losses(run) == losses(ref)

def test_bad_resume_path_is_one_line(tmp_path):
    r = distill("--out", str(tmp_path / "x"), "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists(), "nothing is written for bad input"

def test_warmup_is_applied(reference):
    lrs = [m[4] for m in losses(reference[0])]
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < lrs[4], "tiny stage: 5 warmup steps raise the LR"

def test_accelerate_launch_two_cpu_processes(tmp_path, reference):
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", shutil.which("opd-distill"), "--stage", "tiny", "--set", "train.max_steps=2",
           "--set", "train.checkpoint_every=2", "--set", "prompts.n_prompts=24", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "step-000002" / "manifest.json").exists()
    assert len(losses(out)) == 2
    assert [m[4] for m in losses(out)] == [m[4] for m in losses(reference[0])][:2], "one LR-scheduler step per optimizer step, not per process"

def test_papermill_job(tmp_path):
    pm = pytest.importorskip("papermill")
    out = tmp_path / "pm"
    nb = json.loads((ROOT / "nbs" / "05_train.ipynb").read_text())
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]), "the parameters tag must survive nbdev-clean"
    pm.execute_notebook(str(ROOT / "nbs" / "05_train.ipynb"), str(tmp_path / "05_train.ipynb"), cwd=str(ROOT / "nbs"),
                        parameters=dict(stage="tiny", overrides=["train.max_steps=10", "prompts.n_prompts=24"], out=str(out)), progress_bar=False)
    assert (out / "student").is_dir() and len(losses(out)) == 10

def test_train_compile_wires_regional_compilation(tmp_path):
    "train.compile compiles the named models' blocks in place (lazily: no forward runs here), keeps state-dict keys, rejects bad values."
    from opd.config import load_config
    from opd.train import DistillTrainer
    cfg = load_config("tiny", overrides=["train.compile=student", "prompts.n_prompts=16"])
    tr = DistillTrainer(cfg, tmp_path / "run", progress=False)
    compiled = lambda m: [getattr(b, "_compiled_call_impl", None) is not None for b in m.transformer.transformer_blocks]
    assert all(compiled(tr.pair.student)) and not any(compiled(tr.pair.teacher))
    r = subprocess.run(["opd-distill", "--stage", "tiny", "--set", "train.compile=all", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and "train.compile" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

def test_compiled_training_matches_eager_resumes_and_saves(tmp_path):
    "Compiled blocks (aot_eager: dynamo + autograd, no C++ build) under LoRA, grad. checkpointing, CFG and a partial grading chunk."
    import torch
    from opd.config import load_config
    from opd.train import DistillTrainer
    from opd.models import compile_pair, load_student_pipeline
    cfg = load_config("tiny", overrides=["prompts.n_prompts=16", "train.max_steps=2", "model.lora_rank=4", "model.gradient_checkpointing=true",
                                         "distill.teacher_guidance=3.0", "distill.grade_chunk=12"])
    from torch._dynamo.utils import counters
    counters.clear()
    trainers = {}
    for name in ("eager", "compiled"):
        tr = DistillTrainer(cfg, tmp_path / name, progress=False)
        if name == "compiled": assert compile_pair(tr.pair, "both", backend="aot_eager") == {"teacher": 4, "student": 2}
        tr.train()
        trainers[name] = tr
    assert counters["stats"]["unique_graphs"] >= 2, "the compiled blocks ran compiled (not a silent eager fallback)"
    rows = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in trainers}
    for a, b in zip(rows["eager"], rows["compiled"]):
        for k in ("total_loss", "kl_loss", "grad_norm"): assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])
    tr = trainers["compiled"]
    ck = tr.save_checkpoint()
    again = DistillTrainer(cfg, tmp_path / "compiled", progress=False); again.resume(str(ck))
    sd = lambda t: t.accel.unwrap_model(t.pair.student.transformer).state_dict()
    a, b = sd(tr), sd(again)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    pipe = load_student_pipeline(tmp_path / "compiled" / "student")
    assert pipe.transformer is not None

def test_pipeline_hands_its_pair_to_training_without_changing_it(tmp_path):
    "The pipeline's text-cache/teacher-dataset pair, reused for training, trains exactly like `opd-distill`'s own (LoRA init included)."
    from opd.config import load_config
    from opd.pipeline import run_pipeline
    from opd.train import distill
    cfg = load_config("tiny", overrides=["prompts.n_prompts=16", "train.max_steps=3", "model.lora_rank=4"])
    run_pipeline(cfg, tmp_path / "pipe", steps=["prompts", "text_cache", "teacher_dataset", "distill"], progress=False, log=lambda *a: None)
    distill(cfg, tmp_path / "solo", progress=False)
    cols = lambda d: [tuple(json.loads(l)[k] for k in LOSSES) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert cols("pipe") == cols("solo")

@pytest.mark.parametrize("n_sub", [2, 0])
def test_selective_grading_same_losses(tmp_path, n_sub):
    "The teacher grades only the trained states (full_grading_every=0) or every state (1): identical loss columns, less teacher work."
    from opd.config import load_config
    from opd.train import distill
    runs = {}
    for every in (0, 1):
        cfg = load_config("tiny", overrides=["train.max_steps=3", "prompts.n_prompts=16", f"train.timesteps_per_sample={n_sub}",
                                             f"train.full_grading_every={every}"])
        distill(cfg, tmp_path / f"every{every}", progress=False)
        runs[every] = [json.loads(l) for l in (tmp_path / f"every{every}" / "metrics.jsonl").read_text().splitlines()]
    cols = ("step", "total_loss", "kl_loss", "kl_nats", "mse_loss", "lr", "grad_norm")
    assert [[r[c] for c in cols] for r in runs[0]] == [[r[c] for c in cols] for r in runs[1]]
    B, K, k_eff = 4, 8, 7
    trained = B * (n_sub or k_eff)
    assert all(r["student_train_states"] == trained for r in runs[0] + runs[1])
    assert all(r["teacher_states"] == trained and r["kl_profile"] is None for r in runs[0])
    assert all(r["teacher_states"] == B * K and len(r["kl_profile"]) == K for r in runs[1])
    prof = (tmp_path / "every1" / "kl_profile.csv").read_text().splitlines()
    assert prof[0] == "step,k,sigma,kl_nats" and len(prof) == 1 + 3 * K
    assert not (tmp_path / "every0" / "kl_profile.csv").exists()
