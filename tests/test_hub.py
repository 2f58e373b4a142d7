"""The real SD3.5 loading path, offline: tiny replicas of the hub repos in a hub cache (`opd-hub-replica`), the final stage end to end on the
real hub ids, the pilot's pruned + LoRA student through the local-folder spec, and the one-line errors a user meets."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

from opd.config import latest_dir
from opd.hub import LARGE, MEDIUM, REPLICA_MARK, SMOKE_OVERRIDES, check_command, replica_env, repo_folder

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
TOKEN = "hf_" + "opdTestTokenNeverWritten0123456789"

@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    "Both replicas, written by the console script."
    d = tmp_path_factory.mktemp("hub-cache")
    r = subprocess.run([shutil.which("opd-hub-replica") or pytest.fail("opd-hub-replica is not installed"), "--out", str(d)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{LARGE}: " in r.stdout and f"{MEDIUM}: " in r.stdout
    return d

def snapshot(cache: Path, repo: str) -> Path:
    rev = json.loads((cache / REPLICA_MARK).read_text())["revisions"][repo]
    assert (cache / repo_folder(repo) / "refs" / "main").read_text() == rev
    return cache / repo_folder(repo) / "snapshots" / rev

def test_final_stage_on_the_hub_ids(replica, tmp_path):
    "SD3.5 Large → Medium by hub id, offline from the replica cache: prompts to survey; the student reloads with all three encoders; no token in any file."
    run = tmp_path / "final"
    r = subprocess.run(check_command("final", run), capture_output=True, text=True, timeout=600,
                       env=replica_env(replica, ENV) | {"HF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr[-4000:]
    state = json.loads((run / "pipeline.json").read_text())
    assert [k for k, v in state["steps"].items() if v["done"]] == ["prompts", "text_cache", "teacher_dataset", "distill", "eval", "grids", "survey"]
    cfg = json.loads((run / "run.json").read_text())
    assert cfg["stage"] == "final"
    # the T5 path: 77 CLIP + 256 T5 tokens per cached prompt, keyed by the replica's revision
    from safetensors.torch import load_file
    [key] = [p for p in (run / "text_cache").iterdir() if p.is_dir()]
    assert json.loads((key / "encoders.json").read_text())["max_sequence_length"] == 256
    assert tuple(load_file(next(key.glob("*.safetensors")))["prompt_embeds"].shape) == (333, 64)
    info = json.loads((run / "student" / "opd_student.json").read_text())
    assert (info["kind"], info["base_pipeline"], info["num_layers"]) == ("full", MEDIUM, 24)
    assert (latest_dir(run, "survey") / "survey.csv").is_file() and (latest_dir(run) / "summary.csv").is_file()
    for f in run.rglob("*"):
        assert not f.is_file() or TOKEN.encode() not in f.read_bytes(), f"HF_TOKEN written to {f}"
    code = ("import sys; from opd.models import load_student_pipeline; p = load_student_pipeline(sys.argv[1]);"
            "assert type(p.text_encoder_3).__name__ == 'T5EncoderModel' and type(p.tokenizer_3).__name__.startswith('T5Tokenizer');"
            "assert tuple(p.transformer.config.dual_attention_layers) == tuple(range(13));"
            "im = p('a red leather handbag', num_inference_steps=2, height=32, width=32, max_sequence_length=256, output_type='np').images;"
            "print(im.shape, float(im.std()))")
    r = subprocess.run([sys.executable, "-c", code, str(run / "student")], capture_output=True, text=True, timeout=300, env=replica_env(replica, ENV))
    assert r.returncode == 0, r.stderr[-3000:]
    shape, std = r.stdout.split(")")[0] + ")", float(r.stdout.split(")")[1])
    assert shape == "(1, 32, 32, 3)" and std > 0

def test_pilot_pruned_lora_student_through_local_folders(replica, tmp_path):
    "The pilot's pair from the replica's snapshot folder: Medium's real block layout pruned, LoRA on the real module names, saved and reloaded."
    import torch
    from opd.config import load_config
    from opd.models import load_models, load_student_pipeline
    medium = snapshot(replica, MEDIUM)
    cfg = load_config("pilot", overrides=[*SMOKE_OVERRIDES, f"model.teacher={medium}", "model.lora_rank=2", "model.dtype=float32"])
    pair = load_models(cfg, device="cpu", cache_dir=tmp_path / "text_cache")
    tr = pair.student.transformer
    assert (tr.config.num_layers, tr.config.dual_attention_layers) == (13, tuple(range(12)))       # keep 0..11 (dual) + 23 (last, not dual)
    lora = [n for n, _ in tr.named_modules() if n.endswith(".lora_A")]
    assert any(".attn.to_q." in n for n in lora) and any(".attn2.to_q." in n for n in lora) and not any("add_q_proj" in n for n in lora)
    assert pair.precompute(["a red leather handbag", "a blue running shoe"], progress=False) == 3 and not pair.text.encoders.loaded
    emb = pair.encode(["a red leather handbag"])
    assert tuple(emb.prompt_embeds.shape) == (1, 77 + 128, 64)
    pair.student.velocity(torch.randn(1, *pair.latent_shape), 0.5, emb).square().mean().backward()
    assert {n for n, p in tr.named_parameters() if p.grad is not None} == {n for n, p in tr.named_parameters() if "lora_" in n}
    path = pair.save_student(tmp_path / "student")
    info = json.loads((path / "opd_student.json").read_text())
    assert (info["kind"], info["base_pipeline"], info["transformer"]) == ("lora", str(medium), True)
    pipe = load_student_pipeline(path)
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel" and pipe.transformer.config.num_layers == 13
    im = pipe("a red leather handbag", num_inference_steps=2, height=32, width=32, max_sequence_length=128, output_type="np").images
    assert im.shape == (1, 32, 32, 3)

def pipeline_error(argv, capsys, out: Path) -> str:
    """Run `opd-pipeline` in-process; it must exit 2 with one line on stderr and write nothing. (`--no-preflight`: the spec checks'
    own messages — what opd-distill and opd-build-teacher-dataset print; with the preflight the same ✗ comes as a table first.)"""
    from opd.pipeline import main
    with pytest.raises(SystemExit) as e: main([*argv, "--out", str(out), "--no-preflight"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists(), sorted(out.rglob("*"))
    return err

@pytest.mark.parametrize("status", ["gated", "unauthorized"])
def test_gated_or_not_logged_in(status, monkeypatch, capsys, tmp_path):
    "The hub says no (huggingface_hub's real exception classes, raised where the download asks for file metadata): one line naming the fix."
    import httpx, huggingface_hub.constants as hc, huggingface_hub.file_download as fd, opd.models as om
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    def refuse(url, *a, **k):
        resp = httpx.Response(401 if status == "unauthorized" else 403, request=httpx.Request("HEAD", url))
        if status == "gated": raise GatedRepoError(f"403 Client Error. Cannot access gated repo for url {url}.", response=resp)
        raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}", response=resp)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(om, "_hub_reachable", lambda host: True)
    monkeypatch.setattr(fd, "get_hf_file_metadata", refuse)
    err = pipeline_error(["--stage", "final"], capsys, tmp_path / "run")
    assert f"model.teacher='{LARGE}': the hub refused" in err and "accept the licence" in err and "hf auth login" in err
    assert ("gated repo" in err) == (status == "gated") and ("HTTP 401" in err) == (status == "unauthorized")

def test_hub_id_offline_and_not_cached(monkeypatch, capsys, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    err = pipeline_error(["--stage", "pilot"], capsys, tmp_path / "run")
    assert f"model.teacher='{MEDIUM}'" in err and "not in the local HF cache" in err

def test_folder_without_transformer(replica, capsys, tmp_path):
    bad = tmp_path / "medium-no-transformer"
    shutil.copytree(snapshot(replica, MEDIUM), bad)                  # symlinks followed: a plain folder, as `hf download --local-dir` leaves
    shutil.rmtree(bad / "transformer")
    err = pipeline_error(["--stage", "pilot", "--set", f"model.teacher={bad}"], capsys, tmp_path / "run")
    assert "without transformer/config.json" in err and str(bad) in err

def test_student_with_other_text_encoders(replica, capsys, tmp_path):
    student = tmp_path / "medium-other-t5"
    shutil.copytree(snapshot(replica, MEDIUM), student)
    c = json.loads((student / "text_encoder_3" / "config.json").read_text()); c["num_layers"] = 3
    (student / "text_encoder_3" / "config.json").write_text(json.dumps(c))
    err = pipeline_error(["--stage", "final", "--set", f"model.teacher={snapshot(replica, LARGE)}", "--set", f"model.student={student}"], capsys, tmp_path / "run")
    assert "text encoders differ from the teacher's" in err and "text_encoder_3.num_layers 2 (teacher) vs 3 (student)" in err and "prune:teacher" in err

def test_replica_is_deterministic_across_processes(replica, tmp_path):
    "The same seed writes byte-identical files: the revisions (a hash of every file's etag) match the console script's."
    from opd.hub import write_hub_replica
    snaps = write_hub_replica(tmp_path / "again", seed=0, progress=False)
    assert {r: s.name for r, s in snaps.items()} == json.loads((replica / REPLICA_MARK).read_text())["revisions"]
