"""RULER through EleutherAI's lm-eval (``pip install 'lm-eval[hf,ruler]==0.4.13'``), offline, MoBA beside full.

What lm-eval 0.4.13 needs to run RULER offline, and what this adapter does about it:

* The model goes in as an object (our :func:`moba_cli.integrations.load_model`), switched between MoBA
  and full attention; lm-eval's own loader would not know the ``moba`` attention. MoBA calls are counted
  to prove it served the run.
* The synthetic tasks size their prompts with a tokenizer named in ``metadata`` (a path; an object is
  ignored), and build 500 samples per length in order: samples are picked by index per length, because
  ``limit`` would only take the first length's.
* Importing the RULER helpers calls ``nltk.download("punkt_tab")``; it is stubbed (offline anyway). The
  essay tasks download Paul Graham essays and split sentences with punkt: with ``essay_haystack`` a local
  prose file replaces the essays and a regex splits sentences (the haystack then differs from RULER's).
* The network is blocked while lm-eval runs (hub offline flags and a socket guard): a task that still
  reaches for it fails with one line. Each task runs under a time limit (``ruler_vt`` can loop forever
  with a small-vocabulary tokenizer).
* ``ruler_fwe`` overshoots its length by ~2% and HFLM left-truncates prompts longer than
  ``max_length - max_gen_toks``: ``max_length`` is set well above the longest length. Scores of lengths not
  asked for (lm-eval's ``4096: -1`` placeholder) are dropped. No chat template (base models).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moba_cli.errors import MobaError
from moba_cli.evals import model as m

LM_EVAL_VERSION = "0.4.13"
INSTALL = "pip install 'lm-eval[hf,ruler]==0.4.13'  (or: pip install 'moba-cli[eval]')"
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
QA_TASKS = ("ruler_qa_squad", "ruler_qa_hotpot")
SAMPLES_PER_LENGTH = 500  # what lm-eval's RULER builds for each length, in order
MAX_GEN_TOKS = 128  # RULER's largest generation budget (niah tasks)


class NetworkBlocked(OSError):
    """Raised when lm-eval tries to open a network connection during an offline run."""


class TaskTimeout(BaseException):  # noqa: N818 - not an Exception, so lm-eval's broad excepts let it through
    """A task ran past its time limit."""


def check_lm_eval() -> str:
    """lm-eval's version; one clear line when it is missing."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate  # noqa: F401
    except ImportError:
        raise MobaError(f"moba eval ruler needs lm-eval with its RULER extra: {INSTALL}") from None
    import importlib.metadata

    return importlib.metadata.version("lm-eval")


def parse_tasks(spec: str, essay_haystack: str | None) -> list[str]:
    """``default`` (the six offline tasks), ``all`` (those and, with an essay haystack, the essay tasks) or names."""
    names: list[str] = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if not part:
            continue
        if part == "default":
            names += DEFAULT_TASKS
        elif part == "all":
            names += DEFAULT_TASKS + (ESSAY_TASKS if essay_haystack else ())
        elif part in ("ruler",) or part in QA_TASKS:
            raise MobaError(f"--tasks {part}: the RULER QA tasks download their data sets and cannot run offline "
                            f"(the 'ruler' group includes them); choose from {', '.join(DEFAULT_TASKS + ESSAY_TASKS)}")
        elif part in ESSAY_TASKS:
            if not essay_haystack:
                raise MobaError(f"--tasks {part} downloads Paul Graham essays; pass --essay-haystack FILE to run it "
                                "offline on a local prose haystack")
            names.append(part)
        elif part in DEFAULT_TASKS:
            names.append(part)
        else:
            raise MobaError(f"unknown RULER task {part!r}; choose from default, all, "
                            f"{', '.join(DEFAULT_TASKS + ESSAY_TASKS)}")
    if not names:
        raise MobaError("--tasks is empty; try default")
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def network_blocked() -> Iterator[None]:
    """No connection leaves the process (local sockets still work)."""
    original = socket.socket.connect

    def guarded(self, address):  # type: ignore[no-untyped-def]
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkBlocked(f"network access to {address!r} is blocked during an offline evaluation")
        return original(self, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):  # type: ignore[no-untyped-def]
        raise TaskTimeout(what)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def split_sentences(text: str) -> list[str]:
    """A plain sentence splitter standing in for nltk's punkt on a local haystack."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def prepare_imports(essay_haystack: str | None) -> None:
    """Import lm-eval's RULER helpers without their punkt download; point the essay loader at a local file."""
    import nltk

    real_download = nltk.download
    nltk.download = lambda *a, **k: False  # offline: the import-time punkt download would reach the network
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # its "Downloaded punkt" is untrue
            from lm_eval.tasks.ruler import niah_utils, prepare_niah
    finally:
        nltk.download = real_download
    if essay_haystack:
        words = re.sub(r"\s+", " ", Path(essay_haystack).read_text(encoding="utf-8", errors="replace")).split(" ")
        real = prepare_niah.get_haystack

        def local_haystack(type_haystack: str):  # type: ignore[no-untyped-def]
            return words if type_haystack == "essay" else real(type_haystack)

        niah_utils.get_haystack = local_haystack
        prepare_niah.cached_sent_tokenize = split_sentences


def _quiet() -> None:
    """lm-eval logs every task's setup at INFO; our progress bar and table say what matters."""
    import logging

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def network_cause(e: BaseException) -> BaseException | None:
    seen = e
    while seen is not None:
        name = type(seen).__name__
        if isinstance(seen, NetworkBlocked | ConnectionError) or name in ("OfflineModeIsEnabled",
                                                                           "LocalEntryNotFoundError"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_ruler(
    lm: m.LoadedModel,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    attns: list[str],
    *,
    essay_haystack: str | None = None,
    time_limit: float = 0,
    batch_size: int = 1,
    tick: Callable[[int, str], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every task at every length for each attention. Returns ``(records, raw lm-eval outputs)``.

    Records: ``{attn, task, length, score (0..1), samples, status}``; ``status`` is ``ok``, ``timeout``,
    ``oom`` or ``error`` (lm-eval itself failed; the record's ``error`` says how). Raw: per attention and
    task, lm-eval's results and its per-sample answers (prompts left out).
    """
    if not 1 <= samples <= SAMPLES_PER_LENGTH:
        raise MobaError(f"--samples must be between 1 and {SAMPLES_PER_LENGTH} (lm-eval builds that many per length)")
    tick = tick or (lambda n, d: None)
    m.set_offline()
    _quiet()
    prepare_imports(essay_haystack)
    import lm_eval.tasks
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lengths = sorted(lengths)
    max_length = int(max(lengths) * 1.05) + MAX_GEN_TOKS + 64
    picks = [k * SAMPLES_PER_LENGTH + i for k in range(len(lengths)) for i in range(samples)]
    metadata = {"tokenizer": str(lm.path), "max_seq_lengths": lengths}
    # Only RULER's own task files are indexed (all of lm-eval's take ~30 s), once for the whole run.
    manager = TaskManager(include_path=str(Path(lm_eval.tasks.__file__).parent / "ruler"), include_defaults=False,
                          metadata=metadata)
    records: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for attn in attns:
        with m.attention(lm, attn):
            hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, max_length=max_length, batch_size=batch_size)
            for task in tasks:
                tick(0, f"{attn}: {task} (building data, then {len(picks)} samples)")
                m.reset_calls(lm)
                t0 = time.perf_counter()
                status, err, res = "ok", None, None
                fresh_generators()
                try:
                    with network_blocked(), deadline(time_limit, task):
                        res = simple_evaluate(
                            model=hflm, tasks=[task], samples={task: picks}, log_samples=True,
                            task_manager=manager, metadata=metadata,
                            apply_chat_template=False, bootstrap_iters=0,
                        )
                except TaskTimeout:
                    status, err = "timeout", f"{task} did not finish in {time_limit:g} s (ruler_vt can loop forever "\
                                             "with a small-vocabulary tokenizer)"
                except Exception as e:  # noqa: BLE001 - network use and OOM get one line; the rest propagates
                    cause = network_cause(e)
                    if cause is not None:
                        raise MobaError(f"RULER task {task} tried to reach the network ({type(cause).__name__}: "
                                        f"{str(cause).splitlines()[0][:160]}); it cannot run offline") from None
                    if m.is_oom(e):
                        m.free_memory(lm.device)
                        status, err = "oom", str(e).splitlines()[0][:200]
                    else:  # lm-eval's own generators fail on some lengths (ruler_cwe: ZeroDivisionError at 1K)
                        status = "error"
                        err = f"lm-eval failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                seconds = round(time.perf_counter() - t0, 3)
                calls = m.moba_calls(lm) if attn == "moba" else None
                tick(len(picks), f"{attn}: {task} done")
                if res is None:
                    for n in lengths:
                        records.append({"attn": attn, "task": task, "length": n, "score": None, "samples": 0,
                                        "status": status, "error": err})
                    continue
                records += _task_records(res, attn, task, lengths, seconds, calls)
                raw.setdefault(attn, {})[task] = _raw(res, task)
    return records, raw


def fresh_generators() -> None:
    """Make lm-eval load its RULER helpers afresh before a task runs, where they hold a module-level
    ``random.Random`` (``ruler_cwe``'s ``RNG``, seeded once at import). lm-eval keeps a loaded helper in
    ``sys.modules`` and that generator goes on from where the last run left it, so a second attention
    would get other samples than the first; loaded again, every run gets the samples of a fresh process."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("lm_eval.tasks.ruler.") and hasattr(mod, "__mtime__") and any(
                isinstance(v, random.Random) for v in vars(mod).values()):
            del sys.modules[name]


def _task_records(res: dict, attn: str, task: str, lengths: list[int], seconds: float, calls: int | None) -> list:
    metrics = res["results"][task]
    per_len: dict[int, int] = {}
    for s in res.get("samples", {}).get(task, []):
        n = int(s["doc"]["max_length"])
        per_len[n] = per_len.get(n, 0) + 1
    out = []
    for n in lengths:
        score = metrics.get(f"{n},none")
        rec = {"attn": attn, "task": task, "length": n, "status": "ok", "samples": per_len.get(n, 0),
               "score": None if score is None or score == -1 else float(score), "seconds": seconds}
        if calls is not None:
            rec["moba_calls"] = calls
        out.append(rec)
    return out


def _raw(res: dict, task: str) -> dict[str, Any]:
    """lm-eval's own results for one task, with per-sample answers (prompt text replaced by its hash)."""
    rows = []
    for s in res.get("samples", {}).get(task, []):
        prompt = str(s["doc"].get("input", ""))
        rows.append({
            "doc_id": s["doc_id"], "length": s["doc"].get("max_length"), "target": s.get("target"),
            "response": s.get("filtered_resps"), "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest()[:16],
            "prompt_chars": len(prompt),
        })
    return {"results": res["results"].get(task), "n-samples": res.get("n-samples", {}).get(task), "samples": rows}


def summarize(records: list[dict[str, Any]], raw: dict[str, Any], attns: list[str], lengths: list[int]) -> dict:
    """Mean score per length per attention, and whether both attentions saw the same prompts."""
    out: dict[str, Any] = {"mean": {}}
    for attn in attns:
        out["mean"][attn] = {}
        for n in lengths:
            got = [r["score"] for r in records if r["attn"] == attn and r["length"] == n and r["score"] is not None]
            out["mean"][attn][str(n)] = sum(got) / len(got) if got else None
    if len(attns) == 2 and all(a in raw for a in attns):
        a, b = (raw[x] for x in attns)
        out["same_prompts"] = all(
            [s["prompt_sha256"] for s in a[t]["samples"]] == [s["prompt_sha256"] for s in b[t]["samples"]]
            for t in a if t in b
        )
    return out
