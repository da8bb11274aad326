"""Defaults, presets and option checks for ``moba bench``: turns command-line text into a :class:`BenchConfig`.

Every bad value raises :class:`~moba_cli.errors.MobaError` with one clear message. Explicit options always
win over a preset, and a preset wins over the defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moba_cli.bench.case import Case
from moba_cli.errors import MobaError
from moba_cli.utils.limits import check_at_most, check_seed
from moba_cli.utils.sizes import format_size, parse_size, parse_size_list

PASSES = ("fwd", "fwd+bwd", "decode")
_PASS_ALIASES = {"fwd": "fwd", "fwd+bwd": "fwd+bwd", "fwd_bwd": "fwd+bwd", "fwdbwd": "fwd+bwd", "decode": "decode"}


@dataclass(frozen=True)
class Preset:
    """A named experiment. ``None`` fields leave the default alone."""

    description: str
    chunk: int | None = None
    chunk_divisor: int | None = None  # chunk = seq // chunk_divisor, per sequence length
    topk: int | None = None
    heads: tuple[int, ...] | None = None
    seq: str | None = None
    passes: tuple[str, ...] | None = None


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "the MoBA paper's 1M-token efficiency setting: chunk 4096, topk 12; 1 and 8 heads; "
        "32k,128k,512k,1m; fwd and fwd+bwd",
        chunk=4096, topk=12, heads=(1, 8), seq="32k,128k,512k,1m", passes=("fwd", "fwd+bwd"),
    ),
    "flashmoba": Preset(
        "FlashMoBA's benchmark setting: chunk 128, topk 8, 16 heads; 64k,128k,256k,512k; fwd+bwd",
        chunk=128, topk=8, heads=(16,), seq="64k,128k,256k,512k", passes=("fwd+bwd",),
    ),
    "10m": Preset(
        "the MoBA paper's 10M-token setting: chunk = seq/64, topk 3, 1 head; 10m; fwd",
        chunk_divisor=64, topk=3, heads=(1,), seq="10m", passes=("fwd",),
    ),
}

# Defaults without a preset. The CPU values make a smoke run of a few seconds.
GPU_DEFAULTS = {"seq": "32k,128k", "batch": 1, "heads": (8,), "head_dim": 128, "chunk": 512, "topk": 3,
                "repeats": 10, "dtype": "bf16"}
CPU_DEFAULTS = {"seq": "256,512", "batch": 1, "heads": (2,), "head_dim": 32, "chunk": 64, "topk": 3,
                "repeats": 3, "dtype": "fp32"}
CPU_MAX_SEQ = 16384  # a CPU run is a smoke test of the bench itself, not a measurement
# Timed calls are kept as CUDA events, and each checked row costs a float32 reference over the whole
# sequence: past these the run would take hours, not give a better number.
MAX_REPEATS = 10_000
MAX_CHECK_ROWS = 65_536

@dataclass
class BenchConfig:
    """Every option after presets and defaults are applied (saved as the result's ``config``)."""

    seqs: list[int]
    batch: int
    heads: list[int]
    kv_heads: int | None  # None: same as heads (MHA)
    head_dim: int
    chunk: int | None  # None when chunk_divisor is set
    chunk_divisor: int | None
    topk: int
    dtype: str
    passes: list[str]
    providers: list[str]
    repeats: int
    device: str
    preset: str | None = None
    max_dense_seconds: float = 30.0
    check_rows: int = 256
    seed: int = 0
    plots: bool = True
    out: str | None = None
    notes: list[str] = field(default_factory=list)

    def chunk_for(self, seq: int) -> int:
        return max(1, seq // self.chunk_divisor) if self.chunk_divisor else int(self.chunk)

    def cases(self) -> list[Case]:
        """All shapes, grouped by heads and pass, sequence lengths ascending (the estimates need that order)."""
        out = []
        for h in self.heads:
            kv = self.kv_heads or h
            for p in self.passes:
                for s in sorted(self.seqs):
                    out.append(Case(p, self.batch, s, h, kv, self.head_dim, self.chunk_for(s), self.topk,
                                    self.dtype, self.device))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seq_labels"] = [format_size(s) for s in self.seqs]
        d["chunk_rule"] = f"seq/{self.chunk_divisor}" if self.chunk_divisor else None
        return d


def parse_passes(values: list[str] | str | None) -> list[str]:
    """``["fwd", "fwd+bwd"]`` or ``"fwd,decode"`` -> canonical names, in the given order, without repeats."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in _PASS_ALIASES:
                raise MobaError(f"unknown pass {part.strip()!r}; choose fwd, fwd+bwd or decode (several allowed)")
            if _PASS_ALIASES[name] not in out:
                out.append(_PASS_ALIASES[name])
    if not out:
        raise MobaError("--pass needs at least one of fwd, fwd+bwd, decode")
    return out


def parse_int_list(text: str | int, name: str) -> list[int]:
    if isinstance(text, int):
        return [text]
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise MobaError(f"{name} must be an integer or a comma-separated list of integers, got {text!r}") from None
    if not out:
        raise MobaError(f"{name} needs at least one value")
    return out


def parse_providers(text: str | None, known: list[str], default: list[str]) -> list[str]:
    """``--baselines``: ``all`` (default), ``none`` or a comma list of provider names. ``moba-triton`` always runs."""
    if text is None or text.strip().lower() in ("", "all"):
        chosen = list(default)
    elif text.strip().lower() == "none":
        chosen = []
    else:
        chosen = []
        for part in text.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in known:
                raise MobaError(f"unknown provider {part.strip()!r} in --baselines; choose from {', '.join(known)}")
            if name not in chosen:
                chosen.append(name)
    ordered = ["moba-triton"] + [p for p in known if p in chosen and p != "moba-triton"]
    return ordered


def _sizes(text: str | int, flag: str, one: bool = False) -> list[int]:
    """``parse_size_list`` (or ``parse_size`` when ``one``) with the option's name in any error."""
    try:
        return [parse_size(text)] if one else parse_size_list(str(text))
    except MobaError as e:
        raise MobaError(f"{flag}: {e}") from None


def _positive(value: int | None, name: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise MobaError(f"{name} must be >= {minimum}, got {value}")


def build_config(
    *,
    seq: str | None = None,
    batch: int | None = None,
    heads: str | int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    chunk: int | str | None = None,
    topk: int | None = None,
    dtype: str | None = None,
    passes: list[str] | str | None = None,
    baselines: str | None = None,
    repeats: int | None = None,
    preset: str | None = None,
    device: str = "cuda",
    max_dense_seconds: float = 30.0,
    check_rows: int = 256,
    seed: int = 0,
    plots: bool = True,
    out: str | None = None,
) -> BenchConfig:
    """Apply defaults, then the preset, then explicit options; check every value."""
    from moba_cli.bench.providers import DEFAULT_PROVIDERS, PROVIDER_NAMES
    from moba_cli.utils.devices import parse_dtype

    device = device.lower()
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise MobaError(f"unknown device {device!r}; use cuda or cpu")
    on_cpu = device == "cpu"
    base = CPU_DEFAULTS if on_cpu else GPU_DEFAULTS
    pre = None
    if preset is not None:
        if preset.lower() not in PRESETS:
            raise MobaError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        preset = preset.lower()
        pre = PRESETS[preset]

    def pick(explicit, preset_value, default):
        if explicit is not None:
            return explicit
        return preset_value if preset_value is not None else default

    if isinstance(chunk, str):  # "4k" like the other commands; ints pass through to the check below
        chunk = _sizes(chunk, "--chunk", one=True)[0]
    if topk is not None and topk < 1:
        raise MobaError(f"--topk must be >= 1 (it counts the query's own block), got {topk}")
    for value, name in ((batch, "--batch"), (kv_heads, "--kv-heads"), (head_dim, "--head-dim"),
                        (chunk, "--chunk"), (repeats, "--repeats"), (topk, "--topk")):
        _positive(value, name)
        if value is not None:
            check_at_most(value, name)
    if repeats is not None:
        check_at_most(repeats, "--repeats", MAX_REPEATS)
    _positive(check_rows, "--check-rows")
    check_at_most(check_rows, "--check-rows", MAX_CHECK_ROWS)
    check_seed(seed)
    if not (max_dense_seconds > 0):
        raise MobaError(f"--max-dense-seconds must be positive, got {max_dense_seconds}")

    seqs = _sizes(pick(seq, pre.seq if pre else None, base["seq"]), "--seq")
    seqs = sorted(set(seqs))
    check_at_most(pick(batch, None, base["batch"]) * max(seqs), "--batch x --seq (tokens per call)")
    if on_cpu and max(seqs) > CPU_MAX_SEQ:
        raise MobaError(
            f"--device cpu is a small smoke run; use --seq <= {CPU_MAX_SEQ} (got {format_size(max(seqs))})"
        )
    head_list = parse_int_list(heads, "--heads") if heads is not None else list(pre.heads if pre and pre.heads
                                                                              else base["heads"])
    for h in head_list:
        _positive(h, "--heads")
        check_at_most(h, "--heads")
        if kv_heads is not None and h % kv_heads != 0:
            raise MobaError(f"--heads {h} must be a multiple of --kv-heads {kv_heads} (GQA/MQA groups)")
    chunk_divisor = None
    if chunk is None and pre is not None and pre.chunk_divisor is not None:
        chunk_divisor = pre.chunk_divisor
        chunk_value = None
    else:
        chunk_value = pick(chunk, pre.chunk if pre else None, base["chunk"])
    dtype_name = str(parse_dtype(dtype or base["dtype"])).replace("torch.", "")
    pass_list = parse_passes(passes) if passes is not None else list(pre.passes if pre and pre.passes else ["fwd"])
    providers = parse_providers(baselines, PROVIDER_NAMES, DEFAULT_PROVIDERS["cpu" if on_cpu else "cuda"])
    notes = [f"{b} is not in --baselines: no speedup_vs_{b.replace('-', '_')}" for b in ("sdpa-cudnn", "sdpa-flash")
             if b not in providers and not on_cpu]
    return BenchConfig(
        seqs=seqs,
        batch=pick(batch, None, base["batch"]),
        heads=head_list,
        kv_heads=kv_heads,
        head_dim=pick(head_dim, None, base["head_dim"]),
        chunk=chunk_value,
        chunk_divisor=chunk_divisor,
        topk=pick(topk, pre.topk if pre else None, base["topk"]),
        dtype=dtype_name,
        passes=pass_list,
        providers=providers,
        repeats=pick(repeats, None, base["repeats"]),
        device=device,
        preset=preset,
        max_dense_seconds=float(max_dense_seconds),
        check_rows=check_rows,
        seed=seed,
        plots=plots,
        out=str(out) if out is not None else None,
        notes=notes,
    )

