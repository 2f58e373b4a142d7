"Notebook jobs: every numbered chapter runs under papermill with `stage`, `overrides`, `out`, writes into the run directory, never into nbs/."
import json, os, re, shutil, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
ENV = dict(os.environ, OMP_NUM_THREADS="1")

def parameters_cells(name):
    nb = json.loads((NBS / f"{name}.ipynb").read_text())
    return nb, [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]

def nbs_listing(): return sorted(p.relative_to(NBS).as_posix() for p in NBS.rglob("*") if ".ipynb_checkpoints" not in p.parts)

def numbered(): return sorted(p.stem for p in NBS.glob("[0-9][0-9]_*.ipynb"))

def code_cells(name):
    nb = json.loads((NBS / f"{name}.ipynb").read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]

def test_numbered_notebooks_take_stage_overrides_out():
    names = numbered()
    nums = [int(n[:2]) for n in names]                      # 00–12, then later chapters (14_metrics, …), each number once
    assert nums[:13] == list(range(13)) and nums == sorted(set(nums)), names
    for name in names:
        nb, cells = parameters_cells(name)
        assert len(cells) == 1, f"{name}: {len(cells)} parameters cells"
        src = "".join(cells[0]["source"])
        for v in ("stage", "overrides", "out"): assert re.search(rf"^{v} = ", src, re.M), f"{name}: no `{v}` parameter"
        assert nb["metadata"]["kernelspec"]["name"] == "python3", f"{name}: papermill needs a kernelspec"

def test_pipeline_steps_map_to_notebooks():
    from opd.pipeline import NOTEBOOK_JOBS, STEP_FILES, STEPS
    assert set(NOTEBOOK_JOBS) == set(STEPS) == set(STEP_FILES)
    assert set(NOTEBOOK_JOBS.values()) <= set(numbered())

def test_gpu_cells_skip_without_a_gpu():
    "Plain papermill runs `#| gpu` cells too: on a CPU machine each must only import, or check for CUDA first."
    for name in numbered():
        for src in code_cells(name):
            lines = src.splitlines()
            if not any(l.replace(" ", "") == "#|gpu" for l in lines if l.startswith("#|")): continue
            code = [l for l in lines if l.strip() and not l.startswith("#")]
            assert all(l.startswith(("import ", "from ")) for l in code) or "torch.cuda.is_available()" in src, f"{name}: unguarded #| gpu cell:\n{src[:300]}"

def papermill_job(name: str, run: Path, overrides: str, timeout: int = 300) -> dict:
    "Run nbs/<name>.ipynb with papermill's CLI into run/notebooks/; check nbs/ is untouched and no cell errored; the executed notebook."
    pm = shutil.which("papermill") or pytest.skip("papermill is not installed")
    dest = run / "notebooks" / f"{name}.ipynb"
    dest.parent.mkdir(parents=True)
    before = nbs_listing()
    r = subprocess.run([pm, str(NBS / f"{name}.ipynb"), str(dest), "-p", "stage", "tiny", "-p", "out", str(run),
                        "-p", "overrides", overrides, "--cwd", str(NBS), "--no-progress-bar"],
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert nbs_listing() == before, "executed copies never land in nbs/"
    nb = json.loads(dest.read_text())
    assert all(o.get("output_type") != "error" for c in nb["cells"] for o in c.get("outputs", []))
    return nb

def test_papermill_cli_job(tmp_path):
    run = tmp_path / "run"
    nb = papermill_job("01_prompts", run, '["prompts.n_prompts=24"]')
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and str(run) in "".join(injected[0]["source"])
    for f in ("config.yaml", "run.json", "prompts.jsonl", "prompts_manifest.json"): assert (run / f).is_file(), f
    assert len((run / "prompts.jsonl").read_text().splitlines()) == 24

def test_papermill_cli_config(tmp_path):
    "The cheapest job: 00_config resolves the stage and prepares the run directory."
    run = tmp_path / "run"
    papermill_job("00_config", run, '["seed=3"]', timeout=120)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "notebooks", "run.json"]
    from opd.config import config_hash, load_config
    keys = json.loads((run / "run.json").read_text())
    assert (keys["seed"], keys["config_hash"]) == (3, config_hash(load_config("tiny", overrides=["seed=3"])))

def test_pipeline_notebooks_flag(tmp_path):
    run = tmp_path / "run"
    before = nbs_listing()
    r = subprocess.run(["opd-pipeline", "--stage", "tiny", "--set", "prompts.n_prompts=24", "--steps", "prompts", "--notebooks",
                        "--out", str(run)], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert nbs_listing() == before
    executed = run.resolve() / "notebooks" / "01_prompts.ipynb"
    assert executed.is_file() and str(executed) in r.stdout.split()
    state = json.loads((run / "pipeline.json").read_text())
    assert state["steps"]["prompts"]["outputs"][0] == "notebooks/01_prompts.ipynb"   # relative to the run
    assert len((run / "prompts.jsonl").read_text().splitlines()) == 24      # the notebook got the pipeline's overrides
