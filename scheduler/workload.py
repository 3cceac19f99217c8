"""Workloads for the simulator and the load generator: synthetic types and real traces.

A trace is a CSV with header `num_prefill_tokens,num_decode_tokens[,arrived_at]` (any column
order, extra columns ignored). Arrivals are Poisson at a given rate, or the trace's own times.
Everything random is drawn from `random.Random(seed)`: same seed, same workload.
"""
from __future__ import annotations

import bisect
import csv
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scheduler.fluid import JobType
from scheduler.segments import quantile_bounds

# Traces shipped in the repo (data/README.md says where each comes from and how it was drawn).
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRACE = DATA_DIR / "lmsys_sample.csv"  # 2,000 LMSYS rows: small and fast
LMSYS_TRACE = DATA_DIR / "lmsys_chat_1m_in200_out500.csv"  # the paper's 20,000 LMSYS rows
AZURE_TRACE = DATA_DIR / "azure_conv_sample.csv"  # 5,000 Azure conversation rows, real arrivals

PROMPT_COL, OUTPUT_COL, TIME_COL = "num_prefill_tokens", "num_decode_tokens", "arrived_at"
_INT = re.compile(r"\d+")


class WorkloadError(ValueError):
    """A malformed workload spec or trace; the message is one line and says where."""


# --- synthetic types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TypeSpec:
    prompt_len: int
    output_len: int
    share: float


def _positive_int(text: str, what: str, item: str) -> int:
    text = text.strip()
    if not _INT.fullmatch(text) or int(text) <= 0:
        raise WorkloadError(f"type {item!r}: {what} must be a positive integer, got {text!r}")
    return int(text)


def parse_types(spec: str) -> list[TypeSpec]:
    """Parse "prompt:output[:share],..." e.g. "512:20" or "512:20:0.7,512:50:0.3".

    Give a share for every type or for none (then shares are equal); shares sum to 1.
    """
    items = [s.strip() for s in spec.split(",")] if spec.strip() else []
    if not items or any(not s for s in items):
        raise WorkloadError(f"empty type in spec {spec!r}; expected prompt:output[:share],...")
    parsed: list[tuple[int, int, float | None]] = []
    for item in items:
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise WorkloadError(f"type {item!r}: expected prompt:output[:share]")
        prompt = _positive_int(parts[0], "prompt length", item)
        output = _positive_int(parts[1], "output length", item)
        share = None
        if len(parts) == 3:
            try:
                share = float(parts[2])
            except ValueError:
                raise WorkloadError(f"type {item!r}: share {parts[2]!r} is not a number") from None
            if not math.isfinite(share) or share < 0:
                raise WorkloadError(f"type {item!r}: share must be a finite number >= 0")
        parsed.append((prompt, output, share))
    given = [s for *_, s in parsed if s is not None]
    if not given:
        return [TypeSpec(p, o, 1.0 / len(parsed)) for p, o, _ in parsed]
    if len(given) != len(parsed):
        raise WorkloadError(f"spec {spec!r}: give a share for every type or for none")
    if abs(sum(given) - 1.0) > 1e-6:
        raise WorkloadError(f"spec {spec!r}: shares sum to {sum(given):g}, not 1")
    return [TypeSpec(p, o, s) for p, o, s in parsed]  # type: ignore[arg-type]


# --- traces -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRow:
    prompt_len: int
    output_len: int
    arrived_at: float | None


def _trace_int(text: str, col: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise WorkloadError(f"{where}: {col} {text!r} is not an integer") from None


def read_trace(path: str | Path) -> list[TraceRow]:
    """Read a trace CSV. Zero lengths become 1; negative ones are errors.

    Why 1: the LMSYS trace has a few rows with a 0-token prompt or answer. A real engine always
    feeds at least one token (BOS) and its prefill always emits one output token, so 1 is the
    closest request the system can actually serve; dropping the rows would shift the trace.
    """
    path = Path(path)
    try:
        handle = path.open(newline="")
    except FileNotFoundError:
        raise WorkloadError(f"trace not found: {path}") from None
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {path}: {exc.strerror}") from None
    rows: list[TraceRow] = []
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise WorkloadError(f"{path}:1: empty trace, expected a header "
                                f"{PROMPT_COL},{OUTPUT_COL}[,{TIME_COL}]")
        cols = [h.strip() for h in header]
        missing = [c for c in (PROMPT_COL, OUTPUT_COL) if c not in cols]
        if missing:
            raise WorkloadError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                                f"header is {','.join(cols)}")
        ip, io = cols.index(PROMPT_COL), cols.index(OUTPUT_COL)
        it = cols.index(TIME_COL) if TIME_COL in cols else None
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue  # blank line
            where = f"{path}:{reader.line_num}"
            if len(fields) != len(cols):
                raise WorkloadError(f"{where}: {len(fields)} fields, header has {len(cols)}")
            prompt = _trace_int(fields[ip], PROMPT_COL, where)
            output = _trace_int(fields[io], OUTPUT_COL, where)
            if prompt < 0 or output < 0:
                raise WorkloadError(f"{where}: negative token count ({prompt}, {output})")
            arrived = None
            if it is not None:
                try:
                    arrived = float(fields[it])
                except ValueError:
                    raise WorkloadError(f"{where}: {TIME_COL} {fields[it]!r} is not a number") from None
                if not math.isfinite(arrived) or arrived < 0:
                    raise WorkloadError(f"{where}: {TIME_COL} must be finite and >= 0")
            rows.append(TraceRow(max(1, prompt), max(1, output), arrived))
    if not rows:
        raise WorkloadError(f"{path}: trace has a header but no rows")
    return rows


# --- arrivals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    time: float
    prompt_len: int
    output_len: int


def _check_count(n: int) -> None:
    if n < 0:
        raise WorkloadError(f"number of requests must be >= 0, got {n}")


def _poisson_times(rng: random.Random, rate: float, n: int) -> list[float]:
    if not (rate > 0 and math.isfinite(rate)):
        raise WorkloadError(f"arrival rate must be a finite number > 0, got {rate}")
    _check_count(n)
    times, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def poisson_arrivals(rate: float, n: int, seed: int) -> list[float]:
    """n arrival times (s) of a Poisson process at `rate` requests/s, starting after time 0."""
    return _poisson_times(random.Random(seed), rate, n)


def synthetic_workload(types: list[TypeSpec], rate: float, n: int, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate`; each request's type is drawn independently by share."""
    if not types:
        raise WorkloadError("no request types given")
    rng = random.Random(seed)
    times = _poisson_times(rng, rate, n)
    picks = rng.choices(types, weights=[t.share for t in types], k=n)
    return [Arrival(t, k.prompt_len, k.output_len) for t, k in zip(times, picks)]


def trace_workload(rows: list[TraceRow], n: int, seed: int, rate: float | None = None,
                   replay: bool = False) -> list[Arrival]:
    """n requests with the lengths of `rows` in order (wrapping around), Poisson at `rate` or,
    with `replay`, at the trace's own arrival times (shifted by the trace's span on each wrap)."""
    if not rows:
        raise WorkloadError("the trace has no rows")
    if replay == (rate is not None):
        raise WorkloadError("give either an arrival rate or replay=True (not both, not neither)")
    _check_count(n)
    picked = [rows[i % len(rows)] for i in range(n)]
    if not replay:
        times = _poisson_times(random.Random(seed), rate, n)  # type: ignore[arg-type]
        return [Arrival(t, r.prompt_len, r.output_len) for t, r in zip(times, picked)]
    stamps = [r.arrived_at for r in rows]
    if any(s is None for s in stamps):
        raise WorkloadError(f"replay needs the trace's {TIME_COL} column, which it lacks")
    first, last = min(stamps), max(stamps)  # type: ignore[type-var]
    # One mean gap after the last arrival before the trace starts again.
    period = (last - first) * len(rows) / max(1, len(rows) - 1) if len(rows) > 1 else 1.0
    out = [Arrival(r.arrived_at + (i // len(rows)) * period, r.prompt_len, r.output_len)  # type: ignore[operator]
           for i, r in enumerate(picked)]
    return sorted(out, key=lambda a: a.time)


def job_types(arrivals: Sequence[Arrival], rate: float, max_types: int = 10) -> list[JobType]:
    """Bin a workload into <= max_types types for the fluid model (quantile bins of output length).

    Each type takes its bin's mean prompt and mean output length (rounded) and the bin's share of
    `rate`, so Throughput* = sum lambda_j o_j matches the workload up to rounding.
    """
    if not arrivals:
        raise WorkloadError("no arrivals to bin into types")
    if not rate > 0:
        raise WorkloadError(f"rate must be > 0, got {rate}")
    bounds = quantile_bounds([a.output_len for a in arrivals], max_types)
    bins: list[list[Arrival]] = [[] for _ in bounds]
    for a in arrivals:
        bins[bisect.bisect_left(bounds, a.output_len)].append(a)
    total = len(arrivals)
    return [JobType(prompt_len=round(sum(a.prompt_len for a in b) / len(b)),
                    output_len=max(1, round(sum(a.output_len for a in b) / len(b))),
                    rate=rate * len(b) / total)
            for b in bins if b]
