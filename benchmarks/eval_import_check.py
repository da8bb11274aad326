"""Check that `moba eval ruler` imports with only what the GPU machine has plus the wheels of gpu_wheels.sh.

Run here (where lm-eval is installed): every installed distribution that is neither on the GPU machine
nor in the wheel list is hidden from ``import``; then lm-eval, HFLM and the RULER data builders of the
default tasks are imported, one task's data is built offline and one sample is scored through
:func:`moba_cli.evals.ruler.run_ruler`. Exit code 0 means the wheel list suffices.

    python benchmarks/eval_import_check.py MODEL_DIR
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

# What the GPU machine has (its packages and their usual dependencies).
GPU_HAS = {
    "torch", "triton", "nvidia", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
    "typing-extensions", "setuptools", "transformers", "huggingface-hub", "hf-xet", "tokenizers", "safetensors",
    "regex", "packaging", "pyyaml", "numpy", "tqdm", "requests", "urllib3", "idna", "certifi",
    "charset-normalizer", "httpx", "httpx2", "httpcore", "httpcore2", "anyio", "sniffio", "h11", "truststore",
    "accelerate", "psutil", "pandas", "python-dateutil", "pytz", "tzdata", "six", "pyarrow", "scipy", "sacrebleu",
    "portalocker", "tabulate", "colorama", "lxml", "sentencepiece", "tiktoken", "matplotlib", "pillow",
    "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "rich", "markdown-it-py", "mdurl", "pygments",
    "typer", "click", "shellingham", "annotated-doc", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection", "moba-cli",
    "kernels",  # not on the GPU machine, but transformers reads its metadata here: hiding only its import breaks it
}


def wheel_names() -> set[str]:
    text = (Path(__file__).with_name("gpu_wheels.sh")).read_text()
    block = text.split("WHEELS=(", 1)[1].split(")", 1)[0]
    return {norm(w.split("==")[0]) for w in block.split()}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, hidden: set[str]):
        self.hidden = hidden
        self.refused: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        top = fullname.split(".")[0]
        if top in self.hidden:
            self.refused.add(top)
            raise ModuleNotFoundError(f"No module named {top!r} (hidden: not on the GPU machine)", name=top)
        return None


def main() -> int:
    allowed = {norm(n) for n in GPU_HAS} | wheel_names()
    hidden = set()
    for top, dists in md.packages_distributions().items():
        if not any(norm(d) in allowed for d in dists):
            hidden.add(top)
    finder = Hide(hidden)
    sys.meta_path.insert(0, finder)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):  # noqa: ANN001 - availability probes (transformers, lm-eval) see nothing
        if name.split(".")[0] in hidden:
            finder.refused.add(name.split(".")[0])
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    from moba_cli.evals import model as m
    from moba_cli.evals import ruler as rl

    m.set_offline()
    rl.prepare_imports(None)
    import torch
    from lm_eval import simple_evaluate  # noqa: F401
    from lm_eval.models.huggingface import HFLM  # noqa: F401
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.ruler import cwe_utils, fwe_utils, niah_utils, vt_utils  # noqa: F401

    TaskManager()
    with rl.network_blocked():
        data = niah_utils.niah_single_1(tokenizer=sys.argv[1], max_seq_lengths=[512])
    lm = m.load(sys.argv[1], ["full"], device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                dtype=torch.float32)
    records, _ = rl.run_ruler(lm, ["niah_single_1"], [512], 1, ["full"])
    assert records and records[0]["status"] == "ok", records
    print(f"ok: built {len(data['test'])} niah_single_1 samples and scored one; "
          f"hidden imports refused: {sorted(finder.refused)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
