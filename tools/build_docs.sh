#!/usr/bin/env bash
# tools/build_docs.sh: build the nbdev/Quarto site into _docs/ (optional; never executes notebooks fully).
#
#   bash tools/build_docs.sh            # build _docs/ if Quarto can be had, else only check nbdev's doc processing
#   DOCS_REQUIRED=1 bash tools/build_docs.sh   # fail (exit 3) when Quarto cannot be had
#   DOCS_NO_INSTALL=1 bash tools/build_docs.sh  # don't try to install Quarto (CI: the preprocessing check only)
#
# Quarto: a `quarto` already on PATH is used; otherwise `pip install quarto-cli` into a throwaway venv.
# NB: quarto-cli on PyPI is an sdist whose build downloads the Quarto tarball from GitHub releases;
# where only PyPI/npm/Debian are reachable that install fails, and this script falls back to step 1 only.
#
# Step 1 (always): nbdev's docs preprocessing (proc_nbs -> _proc/). It runs exported cells, show_doc cells and
#   every code cell that contains an import statement (nbdev's exec_show_docs), so a cell mixing imports with
#   test/demo code is executed here -- including #| gpu/slow/notest cells (tst_flags do not apply).
# Step 2 (with Quarto): nbdev-docs -> quarto render --no-execute semantics (.ipynb are never executed by Quarto
#   unless `execute: enabled: true`), output moved to _docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
WORKERS=${DOCS_WORKERS:-2}
t0=$(date +%s)

tmp=$(mktemp -d /tmp/opd-docs.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if ! command -v quarto >/dev/null 2>&1 && [ -z "${DOCS_NO_INSTALL:-}" ]; then
  echo "== installing quarto-cli into $tmp/venv (throwaway)"
  python -m venv --system-site-packages "$tmp/venv"
  if "$tmp/venv/bin/pip" install -q quarto-cli >"$tmp/pip.log" 2>&1 && "$tmp/venv/bin/quarto" --version >/dev/null 2>&1; then
    export PATH="$tmp/venv/bin:$PATH"
  else
    echo "quarto-cli could not be installed (its build downloads Quarto from GitHub):"; tail -3 "$tmp/pip.log" | sed 's/^/  /'
  fi
fi

if command -v quarto >/dev/null 2>&1; then
  echo "== nbdev-docs with quarto $(quarto --version)"
  nbdev-docs --n-workers "$WORKERS"
  n=$(find _docs -name '*.html' | wc -l)
  echo "== built _docs/: $n HTML pages in $(( $(date +%s) - t0 ))s"
  [ -f _docs/index.html ] || { echo "_docs/index.html missing"; exit 1; }
  exit 0
fi

# No Quarto: run nbdev's preprocessing without nbdev's own installer (nbdev-proc-nbs would try sudo+curl).
echo "== no quarto: checking nbdev's docs preprocessing only (_proc/)"
# (python -c, not a heredoc: proc_nbs uses spawn workers, which cannot re-import a <stdin> __main__)
python -c '
import sys, nbdev.doclinks
from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
from nbdev.serve import proc_nbs
refresh_quarto_yml()                 # rewrites nbs/nbdev.yml from pyproject.toml (no-op when in sync)
nbdev.doclinks._build_modidx()
nbdev_sidebar.__wrapped__()          # no-op: custom_sidebar = true
proc_nbs(n_workers=int(sys.argv[1]), force=True)
' "$WORKERS"
echo "== _proc/ ok: $(ls _proc/*.ipynb | wc -l) notebooks processed in $(( $(date +%s) - t0 ))s (site not rendered: no quarto)"
if [ -n "${DOCS_REQUIRED:-}" ]; then exit 3; fi
