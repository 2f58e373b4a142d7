#!/usr/bin/env python
"""Execute the chapters in place, and check that their stored outputs are there and current.

    python tools/chapters.py run   [NB ...] [--n-workers 2]   # execute CPU cells, store their outputs in the .ipynb
    python tools/chapters.py check [NB ...] [--n-workers 2]   # re-execute in memory, compare with what is stored

NB defaults to every `nbs/*.ipynb`. Both commands run exactly the cells `nbdev-test` runs: the same cell
filter (`nbdev.test._skip_cell` with the project's `tst_flags`, so `#| slow`, `#| gpu`, `#| notest` cells,
`#| eval: false` cells and `skip_exec` notebooks are left out), the same kernel (execnb's `CaptureShell`),
the working directory `nbs/` and `IN_TEST=1`. Each notebook runs in a fresh Python process, deterministically:
OMP/MKL one thread, `torch.set_num_threads(1)`, `random`/`numpy`/`torch` seeded with 0 before the first cell,
`MPLBACKEND=Agg`, `HF_HUB_OFFLINE=1`, figures stored as plain PNG at 80 dpi (no retina doubling).

`run` writes each notebook back with the outputs of the cells it ran (cells it skips lose stale outputs),
then runs `nbdev-clean` on it, so a later `nbdev-clean` changes nothing. Progress bars are stored as their
final state (text after the last carriage return of each line), and an image offered both as PNG and
JPEG (PIL images) as its PNG only.

`check` prints one line per problem and exits 1 when there is any:
- `no stored outputs`: a chapter with cells that run but no output stored at all (never executed by `run`);
- `stale`: a cell whose stored text differs from a fresh run's after normalisation (below), or whose kinds of
  output (text / table / image / error) differ; an error raised by a cell is a problem too.
Compared: stdout streams and the text of results and displays (their text/markdown or text/html where they have one,
else text/plain: pandas' plain view truncates by width). Not compared:
stderr (warnings, progress bars), image bytes (only that an image is there), execution counts.
Normalisation, so that a run on another machine of the same kind agrees: every decimal number
(`0.12345`, `1e-05`) rounded to 3 significant digits; numbers followed by a time unit
(`s`, `ms`, `µs`, `min`, `h`, `it/s`, `s/it`), tqdm's `[00:01<00:02, ...]`, ISO timestamps, the checkout's own path (`<repo>`), `/tmp/...` paths
`0x...` addresses, hex strings of 12+ digits with a letter (git commits, `+dirty`, content hashes) and free disk
space (`77.5 GB free`) masked. A cell whose text is volatile by nature (e.g. a wall-clock benchmark table)
carries the directive `#| volatile`: `check` then only requires that it still has the same kinds of output.
"""
import argparse, json, os, re, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
ENV = dict(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', OPENBLAS_NUM_THREADS='1', MPLBACKEND='Agg',
           HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false', PYTHONHASHSEED='0', PYTHONUNBUFFERED='1')
DPI = 80
PRELUDE = f"""import random as _r, numpy as _np, torch as _t, matplotlib as _mpl
_r.seed(0); _np.random.seed(0); _t.manual_seed(0); _t.set_num_threads(1)
_mpl.rcParams.update({{'figure.dpi': {DPI}, 'savefig.dpi': {DPI}}})
del _r, _np, _t, _mpl"""

# ---------------------------------------------------------------- executing one notebook (in a worker process)
def _final_state(text):
    "Text as a terminal shows it: for each line, what follows its last carriage return"
    return '\n'.join(l.rstrip('\r').rsplit('\r', 1)[-1] for l in text.split('\n'))

def execute(fn, timeout=600):
    "Run the cells of notebook `fn` that nbdev-test runs; return (notebook with outputs, error or None)"
    os.environ.update(ENV, IN_TEST='1')
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    from nbdev.frontmatter import nb_frontmatter
    from fastcore.basics import str2bool
    fn = Path(fn).resolve()
    cfg = get_config(fn.parent)
    flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags)
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    if str2bool(nb_frontmatter(nb).get('skip_exec', False)): return nb, None
    skip = _skip_cell(nb, flags)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    sys.path.insert(0, str(cfg.config_path))
    k = CaptureShell(fn, mpl_format='png')
    k.run(PRELUDE)
    err = None
    with working_directory(fn.parent):
        for c in nb.cells:
            if skip(c): continue
            k.cell(c, timeout=timeout)
            for o in c.outputs:
                if o.get('output_type') == 'stream': o['text'] = _final_state(''.join(o['text'])).splitlines(True)
                d = o.get('data', {})
                if 'image/png' in d: d.pop('image/jpeg', None)      # a PIL image offers both: keep one copy
            if k.exc:
                err = f"cell {c.idx_} ({c.id}): {type(k.exc).__name__}: {k.exc}".splitlines()[0]
                break
    return nb, err

def _worker(fn, out):
    "Entry point of the worker process: execute `fn`, write the resulting notebook JSON to `out`"
    from fastcore.nbio import write_nb
    nb, err = execute(fn)
    write_nb(nb, out)
    if err: print(err, file=sys.stderr); sys.exit(1)

def _spawn(fn, out):
    "Execute `fn` in a fresh process; return its error line or None"
    env = {**os.environ, **ENV}
    r = subprocess.run([sys.executable, __file__, '_worker', str(fn), str(out)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode == 0: return None
    lines = [l for l in r.stderr.splitlines() if l.strip() and 'virtualenv' not in l and l.strip() != 'warn(']
    return lines[-1] if lines else f'worker exited {r.returncode}'

# ---------------------------------------------------------------- comparing outputs
_TEXT = ('text/plain', 'text/markdown', 'text/html')
_UNIT = r'(?:s|ms|µs|us|ns|sec|secs|seconds|min|mins|minutes|h|it/s|s/it|img/s|images/s)\b'
_SUBS = [
    (re.compile(r'\[\d+:\d+(?::\d+)?<[^\]]*\]'), '[<time>]'),                                # tqdm [00:01<00:02, 3.1it/s]
    (re.compile(r'\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?'), '<timestamp>'),
    (re.compile(r'/tmp/[^\s\'"<>),\]]*'), '<tmp>'),
    (re.compile(r'0x[0-9a-fA-F]{6,}'), '<addr>'),
    (re.compile(r'(?<![0-9a-f.])(?=[0-9a-f]*[a-f])[0-9a-f]{12,}(?:\+dirty)?(?![0-9a-f])'), '<hash>'),   # git commits, content hashes
    (re.compile(r'[\d.]+ ?[KMGT]i?B (free|available)'), '<free space>'),                             # disk space left
    (re.compile(r'(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\s?' + _UNIT), '<time>'),
]
_CHECKOUT = re.compile(r"(?:/[\w.+-]+)+/(?=(?:nbs|outputs)/)")   # <any absolute checkout>/nbs/…, …/outputs/…
_NUM = re.compile(r'(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?(?![\w.])')

def _round(m):
    try: x = float(m.group(0))
    except ValueError: return m.group(0)
    return f'{x:.3g}' if x else '0'

def normalise(text):
    "Mask the checkout's own path, timings, timestamps, temp paths and addresses; round decimals to 3 significant digits"
    text = text.replace(str(ROOT), '<repo>')                      # a clone elsewhere (CI) prints its own absolute paths,
    text = _CHECKOUT.sub('<repo>/', text)                         # and stored outputs hold the path of the checkout that ran them
    for pat, rep in _SUBS: text = pat.sub(rep, text)
    return _NUM.sub(_round, text)

def _kind(o):
    t = o.get('output_type')
    if t == 'stream': return None if o.get('name') == 'stderr' else 'text'
    if t == 'error': return 'error'
    d = o.get('data', {})
    if any(k.startswith('image/') for k in d): return 'image'
    return 'table' if ('text/html' in d or 'text/markdown' in d) else 'text'

def summary(cell):
    "(kinds, normalised text) of a code cell's outputs, as `check` compares them"
    kinds, text = [], []
    for o in cell.get('outputs', []):
        k = _kind(o)
        if k is None: continue
        if not kinds or kinds[-1] != k or k != 'text': kinds.append(k)
        if o.get('output_type') == 'stream': text.append(''.join(o['text']))
        elif k != 'image':
            d = o.get('data', {})
            rich = [m for m in _TEXT[1:] if m in d]               # a table's plain text is pandas' truncated view: compare the table
            text += [''.join(d[m]) for m in (rich or _TEXT[:1]) if m in d]
    return kinds, normalise('\n'.join(text))

def _volatile(src): return re.search(r'^\s*#\s*\|\s*volatile\b', src, re.M) is not None
def _src(c): s = c.get('source', ''); return ''.join(s) if isinstance(s, list) else s

def compare(stored, fresh, name):
    "Problems (one line each) between the stored notebook and a freshly executed one"
    probs = []
    sc, fc = stored['cells'], fresh['cells']
    if [_src(c) for c in sc] != [_src(c) for c in fc]: return [f'{name}: cells changed while checking']
    ran = [i for i, c in enumerate(fc) if c['cell_type'] == 'code' and c.get('outputs')]
    if ran and not any(sc[i].get('outputs') for i in ran): return [f'{name}: no stored outputs (run `python tools/chapters.py run {name}`)']
    for i, (s, f) in enumerate(zip(sc, fc)):
        if f['cell_type'] != 'code': continue
        (sk, st), (fk, ft) = summary(s), summary(f)
        cid = f.get('id', i)
        if sk != fk: probs.append(f'{name}: cell {i} ({cid}) stale: stored outputs {sk or "none"}, a fresh run gives {fk or "none"}')
        elif st != ft and not _volatile(_src(f)):
            a, b = st.splitlines(), ft.splitlines()
            j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            x, y = (a[j] if j < len(a) else '<end>'), (b[j] if j < len(b) else '<end>')
            probs.append(f'{name}: cell {i} ({cid}) stale at output line {j+1}: stored {x[:70]!r}, fresh {y[:70]!r}')
    return probs

# ---------------------------------------------------------------- commands
def _nbs(names):
    if not names: return sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    res = []
    for n in names:
        p = Path(n)
        if not p.exists() and (NBS/n).exists(): p = NBS/n
        if not p.exists() or p.suffix != '.ipynb': sys.exit(f'chapters.py: notebook {n!r} not found (give a path or a name under nbs/)')
        res.append(p.resolve())
    return res

def run(nbs, n_workers):
    import time
    def one(fn):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)/fn.name
            err = _spawn(fn, out)
            if err: return f'{fn.name}: failed: {err}'
            out.replace(fn)
        subprocess.run(['nbdev-clean', '--fname', str(fn)], cwd=ROOT, check=True, capture_output=True)
        print(f'{fn.name}: executed in {time.time()-t0:.0f}s, {fn.stat().st_size/1e3:.0f} kB', flush=True)
    with ThreadPoolExecutor(n_workers) as ex: errs = [e for e in ex.map(one, nbs) if e]
    for e in errs: print(e)
    return 1 if errs else 0

def check(nbs, n_workers):
    def one(fn):
        stored = json.loads(fn.read_text())
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)/fn.name
            err = _spawn(fn, out)
            if err: return [f'{fn.name}: fails: {err}']
            fresh = json.loads(out.read_text())
        return compare(stored, fresh, fn.name)
    with ThreadPoolExecutor(n_workers) as ex: probs = [p for ps in ex.map(one, nbs) for p in ps]
    for p in probs: print(p)
    if not probs: print(f'{len(nbs)} chapters: stored outputs present and current')
    return 1 if probs else 0

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('cmd', choices=['run', 'check', '_worker'])
    p.add_argument('nbs', nargs='*')
    p.add_argument('--n-workers', type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == '_worker': return _worker(*a.nbs)
    nbs = _nbs(a.nbs)
    return (run if a.cmd == 'run' else check)(nbs, a.n_workers)

if __name__ == '__main__': sys.exit(main())
