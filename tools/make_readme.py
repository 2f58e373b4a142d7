"""Build README.md from nbs/index.ipynb (`nbdev-readme` needs Quarto, which this project cannot assume).

Markdown cells are copied as they are; code cells become ```python blocks, except cells marked `#| hide`.
Usage: `python tools/make_readme.py` (write) or `python tools/make_readme.py --check` (exit 1 if README.md drifted).
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n"

def render(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    cells = json.loads(Path(nb_path).read_text())["cells"]
    parts = []
    for c in cells:
        src = "".join(c["source"]).strip()
        if not src: continue
        if c["cell_type"] == "markdown": parts.append(src)
        elif c["cell_type"] == "code":
            lines = src.splitlines()
            if any(l.replace(" ", "").startswith("#|hide") for l in lines): continue
            code = "\n".join(l for l in lines if not l.replace(" ", "").startswith("#|"))
            parts.append(f"```python\n{code}\n```")
    return HEADER + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    readme, text = ROOT / "README.md", render()
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md differs from nbs/index.ipynb: run `python tools/make_readme.py`")
        print("README.md matches nbs/index.ipynb")
    else:
        readme.write_text(text); print(f"wrote {readme}")
