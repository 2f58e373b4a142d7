#!/usr/bin/env bash
# opd GPU check: opd-bench + opd-plan-memory on the real SD3.5 shapes at random init (no weights needed).
# Run ONCE, from the repo root, on one H100/H200 (python3 with torch there; diffusers/pydantic/fastcore come
# from the carried wheels):
#     bash tools/gpu_check.sh            # carry: [".whl"]
# Hard budget: BUDGET seconds (default 465, under 8 minutes) for everything; each step has its own cap and is
# cut to what is left. Small result files go to $OUT (at most 8 files): log.txt, bench_{a,b,c,e}.json,
# plans.json, summary.md. Steps, in order:
#   (a) Large bf16 teacher → Medium full fine-tune (fp32 master, bf16 autocast, grad. checkpointing), 512 px,
#       batch 2, K=8, 4 trained timesteps/sample, final stage's CFG 3.5 / grade_chunk 8 / 333 text tokens
#   (b) the same with LoRA r64
#   (c) 1024 px, batch 1, full fine-tune, one timed iteration
#   (d) opd-plan-memory's predictions for (a)-(c), next to the measured peaks (summary.md)
#   (e) only if time is left: (a) with the teacher's blocks torch.compile'd (eager vs compiled)
#   (f) not in the default set: (a) again with the teacher throughput curve (the grading ceiling) and
#       torch.compile of teacher and student blocks, given all the time that is left — for a session
#       that already has (a)-(d):   STEPS=f bash tools/gpu_check.sh
#   (g) (a) and (h) (c) as the trainer runs them with train.compile=both (the pilot/final default): the
#       iteration, overhead ratio and peak memory of compiled training; the first warm-up iteration compiles
#   (i) the final stage's real shapes: 1024 px, K=28, CFG 3.5, 4 trained states/sample, batch 2, train.compile=both — the
#       teacher grading only the trained states, then every visited state (bench.json: necessary_ratio, full_grading, s/sample)
#   (j) the pilot stage's real shapes: SD3.5 Medium (random) → its pruned student, 512 px, K=20, CFG 4.5, train.compile=both
#       — for a session that has the rest:   STEPS="i j" BUDGET=530 bash tools/gpu_check.sh
# STEPS picks steps (default "a b c d e"); bench.json is rewritten after every measurement, so a cut keeps what was done.
set -u
STEPS=" ${STEPS:-a b c d e} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
T0=$(date +%s)
BUDGET=${BUDGET:-465}
OUT=${OUT:-/tmp/opd_gpu_out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/opd_gpu_runs}; rm -rf "$WORK"; mkdir -p "$WORK"
LOG="$OUT/log.txt"; : > "$LOG"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { local c=$1 reserve=$2 l; l=$(( $(left) - reserve )); (( l < c )) && c=$l; (( c < 0 )) && c=0; echo $c; }
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

DRY=${DRY:-0}   # DRY=1: the same plumbing on the tiny stage, on a CPU box with everything installed (no wheels, no compile)
if [ "$DRY" = 1 ]; then
    say "DRY run: tiny stage, no install"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    say "install (offline wheels: diffusers, pydantic, fastcore → /tmp/site)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/models02/*.whl .whl/typing_extensions-*.whl >>"$LOG" 2>&1 || say "pip install reported an error (see log.txt)"
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, diffusers, pydantic, opd.bench, opd.memory; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
GPU_GIB=$(python3 -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))" 2>/dev/null || echo 80)

BENCH=(python3 -c 'import sys; from opd.bench import main; main(sys.argv[1:])')
BASE=(--stage final --n-prompts 16
      --set model.teacher=random:sd35-large --set model.student=random:sd35-medium
      --set model.dtype=bfloat16 --set train.mixed_precision=bf16 --set model.gradient_checkpointing=true
      --set train.grad_accum=1 --set distill.num_steps=8 --set train.timesteps_per_sample=4
      --set train.compile=none)   # eager baselines; (g)/(h) switch train.compile on (the pilot/final default)
A=("${BASE[@]}" --set model.resolution=512 --set train.batch_size=2)
B=("${A[@]}" --set model.lora_rank=64)
C=("${BASE[@]}" --set model.resolution=1024 --set train.batch_size=1)
if [ "$DRY" = 1 ]; then
    A=(--stage tiny --n-prompts 16 --threads 1 --set train.batch_size=2 --set train.timesteps_per_sample=4)
    B=("${A[@]}" --set model.lora_rank=4)
    C=(--stage tiny --n-prompts 16 --threads 1 --set model.resolution=64 --set train.batch_size=1 --set train.timesteps_per_sample=4)
fi

run_bench() {  # name cap reserve args...
    local name=$1 c; want "$name" || return 0; c=$(cap "$2" "$3"); shift 3
    if (( c < 45 )); then say "skip ($name): only $(left)s left"; return; fi
    say "($name) opd-bench, cap ${c}s: $*"
    timeout -k 10 "$c" "${BENCH[@]}" "$@" --out "$WORK/$name" >>"$LOG" 2>&1
    local rc=$?; say "($name) exit $rc"
    [ -f "$WORK/$name/bench.json" ] && cp "$WORK/$name/bench.json" "$OUT/bench_$name.json"
    [ -f "$WORK/$name/bench.md" ] && cat "$WORK/$name/bench.md" | tee -a "$LOG"
}
# reserves keep time for the later steps: (d) needs ~40 s
run_bench a 130 85 "${A[@]}" --iters 4 --warmup 2
run_bench b 90 30 "${B[@]}" --iters 4 --warmup 2
run_bench c 60 30 "${C[@]}" --iters 1 --warmup 1 --grading-batches 1 --grading-reps 2

if want d; then
say "(d) opd-plan-memory for a, b, c (GPU ${GPU_GIB} GiB), cap $(cap 60 0)s"
timeout -k 5 "$(cap 60 0)" python3 - "$OUT" "$GPU_GIB" "${#A[@]}" "${A[@]}" "${#B[@]}" "${B[@]}" "${#C[@]}" "${C[@]}" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from opd.config import load_config
from opd.memory import plan_memory, plan_table
out, gpu = Path(sys.argv[1]), float(sys.argv[2])
rest, cfgs = sys.argv[3:], {}
for name in "abc":
    n = int(rest[0]); args = rest[1:1 + n]; rest = rest[1 + n:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    stage = args[args.index("--stage") + 1]
    cfgs[name] = load_config(stage, overrides=["prompts.n_prompts=16"] + sets)
plans, rows = {}, []
for name, cfg in cfgs.items():
    p, pf = plan_memory(cfg, gpu), plan_memory(cfg, gpu, adamw="fused")
    train = lambda q: max(v for k, v in q.estimate.phases.items() if k != "text encoding")
    plans[name] = dict(foreach=p.as_dict(), fused_peak_training_gib=train(pf), peak_training_gib=train(p))
    print(plan_table(p))
    b = out / f"bench_{name}.json"
    meas = json.loads(b.read_text()).get("peak_mem_mb") if b.exists() else None
    meas = meas / 1024 if meas else None
    rows.append((name, train(p), train(pf), meas))
(out / "plans.json").write_text(json.dumps(plans, indent=2, default=str))
print("\n| config | predicted (foreach AdamW) GiB | predicted (fused) GiB | measured peak GiB | ratio foreach | ratio fused |")
print("|---|---|---|---|---|---|")
for n, p, pf, m in rows:
    r = lambda x: f"{x / m:.2f}" if m else "—"
    print(f"| {n} | {p:.1f} | {pf:.1f} | {m:.1f} | {r(p)} | {r(pf)} |" if m else f"| {n} | {p:.1f} | {pf:.1f} | — | — | — |")
EOF
say "(d) exit $?"
fi

# (e) compile, only with the time that is left (bench.json is rewritten after each section, so a cut still leaves the eager numbers)
if [ "$DRY" = 1 ]; then say "DRY: skip (e) compile"; else
run_bench e 400 10 "${A[@]}" --iters 2 --warmup 1 --grading-batches "" --compile --compile-targets teacher
run_bench f 900 25 "${A[@]}" --iters 3 --warmup 2 --grading-batches 1,4 --throughput-max-images 64 --compile --compile-targets teacher,student
run_bench g 260 190 "${A[@]}" --set train.compile=both --iters 3 --warmup 2 --grading-batches ""
run_bench h 260 10 "${C[@]}" --set train.compile=both --iters 2 --warmup 2 --grading-batches ""
I=(--stage final --n-prompts 16 --set model.teacher=random:sd35-large --set model.student=random:sd35-medium
   --set model.dtype=bfloat16 --set train.mixed_precision=bf16 --set train.batch_size=2 --set train.grad_accum=1)
J=(--stage pilot --n-prompts 16 --set model.teacher=random:sd35-medium --set model.dtype=bfloat16 --set train.mixed_precision=bf16
   --set train.grad_accum=1)
run_bench i 300 170 "${I[@]}" --iters 3 --warmup 2 --grading-batches "" --throughput-max-images 0
run_bench j 170 10 "${J[@]}" --iters 3 --warmup 2 --grading-batches "" --throughput-max-images 0
fi

say "summary"
python3 - "$OUT" >"$OUT/summary.md" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plans = json.loads((out / "plans.json").read_text()) if (out / "plans.json").exists() else {}
print("| run | device | setup | iteration s | samples/s | overhead ratio (per phase r/g/b/o) | grading speedup b1 / b4 | peak GiB measured | predicted (foreach / fused) |")
print("|---|---|---|---|---|---|---|---|---|")
for name in "abcefgh":
    f = out / f"bench_{name}.json"
    if not f.exists(): print(f"| {name} | — | not run / no output | | | | | | |"); continue
    b = json.loads(f.read_text()); s = b["setup"]; it = b.get("iteration", {})
    setup = f"{s['resolution']}px b{s['batch_size']} K{s['K']} n{s['trained_states_per_sample']} {'LoRA r' + str(s['lora_rank']) if s['lora_rank'] else 'full FT'}{' compiled' if s.get('compile', 'none') != 'none' else ''}"
    ov = b.get("overhead", {})
    ovs = f"{b['overhead_ratio']:.3f} ({'/'.join(f'{ov[k]:.2f}' for k in ('rollout', 'grading', 'backward', 'optimizer'))})" if "overhead_ratio" in b else "—"
    g = b.get("grading", {})
    gs = " / ".join(f"{g[k]['speedup']:.2f}×" if "speedup" in g.get(k, {}) else "—" for k in ("b1", "b4"))
    ce = b.get("grading_ceiling", {})
    if ce: gs += " (max " + " / ".join(f"{ce[k]['max_speedup']:.2f}×" if k in ce else "—" for k in ("b1", "b4")) + ")"
    pl = plans.get(name, {})
    pred = f"{pl['peak_training_gib']:.1f} / {pl['fused_peak_training_gib']:.1f}" if pl else "—"
    peak = f"{b['peak_mem_mb'] / 1024:.1f}" if "peak_mem_mb" in b else "—"
    print(f"| {name} | {b['device'].get('name')} | {setup} | {it.get('wall_s', float('nan')):.3f} | {it.get('samples_per_s', float('nan')):.2f} | {ovs} | {gs} | {peak} | {pred} |")
    c = b.get("compile", {})
    if c.get("calls"):
        for k, v in c["calls"].items(): print(f"|  | compile {k} | eager {1e3 * v['eager_s']:.1f} ms → {1e3 * v['compiled_s']:.1f} ms | {v['speedup']:.2f}× | compile {v['compile_s']:.0f} s | | | | |")
        if c.get("iteration_s"): print(f"|  | compiled iteration | {c['iteration_s']:.3f} s vs eager {c['eager_iteration_s']:.3f} s | {c.get('iteration_speedup') or float('nan'):.2f}× | | | | | |")
    tp = b.get("throughput", {})
    if tp.get("images"): print("|  | teacher ms/image at n images | " + ", ".join(f"{n}: {m:.1f}" for n, m in zip(tp["images"], tp["ms_per_image"])) + " | | | | | | |")
    if c.get("skipped") and name in "ef": print(f"|  | compile | {c['skipped']} | | | | | | |")
EOF
cat "$OUT/summary.md" | tee -a "$LOG"
say "done in $(( $(date +%s) - T0 ))s; files: $(ls "$OUT" | tr '\n' ' ')"
