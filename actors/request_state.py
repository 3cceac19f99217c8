"""RequestStates: what a model actor keeps about its resident requests between steps.

Diff plans (`scheduler.plan.DiffPlan`) carry only changes, so the actor holds, per slot: the
tokens its (re)prefill computes, how many are computed and known, the last token it sampled
(the next decode's input), its sampling parameters and, through `kv.tables.BlockTables`, its
blocks. `apply(plan)` checks the whole plan against that state first and changes nothing when
any check fails (PlanError): every slot it names is live, every start position is exactly what
the actor has computed, every row's tokens are known and fit in the request's own blocks, and
every block handed out is free. Then it applies the changes and returns the step's rows as numpy
arrays in plan order; `advance` records what the step computed and sampled.

numpy only (no torch): the simulated model actor runs the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kv.tables import BlockTables, PlanError
from scheduler.plan import DiffPlan
from scheduler.request import SamplingParams

_I64 = np.int64


def as_array(values) -> np.ndarray:
    """An int32 wire vector (array('i'), list) as int64 numpy (array('i') without a copy)."""
    if isinstance(values, np.ndarray):
        return values.astype(_I64, copy=False)
    try:
        return np.frombuffer(values, dtype=np.int32).astype(_I64)
    except TypeError:
        return np.asarray(values, dtype=_I64)


@dataclass
class StepRows:
    """One step's rows, in plan order."""

    slots: np.ndarray  # [B]
    num_tokens: np.ndarray  # [B]
    start_pos: np.ndarray  # [B]
    sample: np.ndarray  # [B] bool: the row samples a token
    request_ids: list[str]  # [B]
    sampling: list[SamplingParams]  # [B]
    input_ids: np.ndarray | None = None  # [T] plan order (None: not materialized)
    positions: np.ndarray | None = None  # [T]
    slot_mapping: np.ndarray | None = None  # [T]
    tables: np.ndarray | None = None  # [B, max blocks] int32, zero padded
    table_lens: np.ndarray | None = None  # [B] blocks per row

    def subset(self, keep: np.ndarray) -> StepRows:
        """The rows at indices `keep` (ascending), with their materialized inputs: a step run
        in parts (a row that failed excluded, or each row alone to find the one that fails)."""
        keep = np.asarray(keep, dtype=_I64)
        out = StepRows(self.slots[keep], self.num_tokens[keep], self.start_pos[keep], self.sample[keep],
                       [self.request_ids[i] for i in keep.tolist()], [self.sampling[i] for i in keep.tolist()])
        if self.input_ids is not None:
            offsets = np.cumsum(self.num_tokens) - self.num_tokens
            n = self.num_tokens[keep]
            at = np.arange(int(n.sum()), dtype=_I64) + np.repeat(offsets[keep] - (np.cumsum(n) - n), n)
            out.input_ids, out.positions = self.input_ids[at], self.positions[at]
            out.slot_mapping = self.slot_mapping[at]
            out.tables, out.table_lens = self.tables[keep], self.table_lens[keep]
        return out

    @property
    def context_lens(self) -> np.ndarray:
        return self.start_pos + self.num_tokens

    @property
    def num_new_tokens(self) -> int:
        return int(self.num_tokens.sum())

    @property
    def num_attended_kv(self) -> int:
        """KV tokens read by decodes (rows of one token past the prefill)."""
        decode = (self.num_tokens == 1) & self.sample
        return int(self.context_lens[decode].sum())


class RequestStates:
    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, vocab_size: int,
                 capacity: int = 64) -> None:
        self.block_size, self.max_model_len, self.vocab_size = block_size, max_model_len, vocab_size
        self.max_slots = num_blocks  # every resident holds a block: never more residents
        width = min(num_blocks, -(-max_model_len // block_size))
        self.blocks = BlockTables(num_blocks, block_size, width, capacity)
        self.epoch: int | None = None
        self._alloc(capacity)

    def _alloc(self, size: int) -> None:
        old = getattr(self, "live", None)
        n = 0 if old is None else len(old)

        def grown(name: str, dtype) -> np.ndarray:
            out = np.zeros(size, dtype=dtype)
            if old is not None:
                out[:n] = getattr(self, name)
            return out

        self.live = grown("live", bool)
        self.computed = grown("computed", _I64)  # tokens whose KV is written
        self.known = grown("known", _I64)  # tokens known: given + sampled
        self.prefill_len = grown("prefill_len", _I64)  # tokens given with the request
        self.prompt_len = grown("prompt_len", _I64)  # of those, the prompt's
        self.last_token = grown("last_token", _I64)
        self.seed = grown("seed", np.uint64)  # per-request stream of simulated tokens
        # A row of this request failed (its request ends): later rows of it are not computed.
        self.failed = grown("failed", bool)
        for name in ("request_ids", "sampling", "tokens"):
            values = getattr(self, name, [])
            setattr(self, name, values + [None] * (size - len(values)))
        self.blocks.ensure_capacity(size)

    @property
    def num_live(self) -> int:
        return int(self.live.sum())

    def clear(self) -> None:
        self.live.fill(False)
        self.failed.fill(False)
        self.blocks.clear()
        for name in ("request_ids", "sampling", "tokens"):
            getattr(self, name)[:] = [None] * len(self.live)

    # -- one plan ----------------------------------------------------------------------------------
    def apply(self, plan: DiffPlan, materialize: bool = True) -> StepRows:
        """Check `plan` against the state, apply its changes, return its rows (PlanError: the
        plan is refused as a whole and nothing changed)."""
        if plan.block_size != self.block_size:
            raise PlanError(f"plan block_size {plan.block_size} != the cache's {self.block_size}")
        if self.epoch is not None and plan.epoch < self.epoch:
            raise PlanError(f"plan {plan.iteration} of epoch {plan.epoch} arrived after epoch {self.epoch}")
        if plan.epoch != self.epoch:  # the scheduler reset this actor: start from nothing
            self.clear()
            self.epoch = plan.epoch
        where = f"plan {plan.iteration}"
        freed = np.concatenate([as_array(plan.freed_slots), as_array(plan.evicted_slots)])
        news = plan.new_requests
        new_slots = np.array([n.slot for n in news], dtype=_I64)
        slots, n, start = as_array(plan.slots), as_array(plan.num_tokens), as_array(plan.start_pos)
        grow_slots, grow_blocks = as_array(plan.grow_slots), as_array(plan.grow_blocks)
        if not (len(slots) == len(n) == len(start)) or len(grow_slots) != len(grow_blocks):
            raise PlanError(f"{where}: row or block vectors of different lengths")
        self._check_slot_ids(np.concatenate([freed, new_slots, slots, grow_slots]), where)
        if len(np.unique(new_slots)) != len(new_slots):
            raise PlanError(f"{where}: two new requests share a slot")
        # The state as it will be after this plan's releases and additions (small copies).
        live = self.live.copy()
        live[freed] = False
        if live[new_slots].any():
            raise PlanError(f"{where}: a new request's slot {int(new_slots[live[new_slots]][0])} "
                            "holds a live request")
        live[new_slots] = True
        computed, known, prefill = self.computed.copy(), self.known.copy(), self.prefill_len.copy()
        computed[freed] = known[freed] = prefill[freed] = 0
        lengths = self.blocks.lengths.copy()
        lengths[freed] = 0
        new_tokens = [as_array(r.token_ids) for r in news]
        new_blocks = [as_array(r.block_ids) for r in news]
        for slot, tokens, blocks in zip(new_slots.tolist(), new_tokens, new_blocks):
            computed[slot], known[slot] = 0, len(tokens)
            prefill[slot], lengths[slot] = len(tokens), len(blocks)
            self._check_tokens(tokens, where)
        if not live[grow_slots].all():
            raise PlanError(f"{where}: blocks appended to slot {int(grow_slots[~live[grow_slots]][0])}, "
                            "which holds no request")
        self.blocks.check_runs(grow_slots, where)
        np.add.at(lengths, grow_slots, 1)
        self.blocks.check_handout(np.concatenate(new_blocks + [grow_blocks]),
                                  freed[self.live[freed]], where)
        self.blocks.check_fits(lengths[np.concatenate([new_slots, grow_slots])], where)
        end = self._check_rows(slots, n, start, live, computed, known, prefill, lengths, where)
        self._commit_changes(freed, new_slots, news, new_tokens, new_blocks, grow_slots, grow_blocks)
        sample = end >= self.known[slots]
        rows = StepRows(slots, n, start, sample, [self.request_ids[s] for s in slots.tolist()],
                        [self.sampling[s] for s in slots.tolist()])
        if materialize:
            self._materialize(rows, end)
        return rows

    def _check_slot_ids(self, slots: np.ndarray, where: str) -> None:
        if len(slots) and (slots.min() < 0 or slots.max() >= self.max_slots):
            raise PlanError(f"{where}: slot ids outside [0, {self.max_slots})")
        if len(slots) and slots.max() >= len(self.live):
            self._alloc(max(int(slots.max()) + 1, 2 * len(self.live)))

    def _check_tokens(self, tokens: np.ndarray, where: str) -> None:
        if not len(tokens):
            raise PlanError(f"{where}: a new request carries no tokens")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise PlanError(f"{where}: token ids outside the vocabulary of {self.vocab_size}")

    def _check_rows(self, slots, n, start, live, computed, known, prefill, lengths, where) -> np.ndarray:
        if len(np.unique(slots)) != len(slots):
            raise PlanError(f"{where}: a request appears twice")
        if not live[slots].all():
            raise PlanError(f"{where}: row slot {int(slots[~live[slots]][0])} holds no request")
        if len(n) and (n.min() < 1 or start.min() < 0):
            raise PlanError(f"{where}: rows need at least one token and a start >= 0")
        bad = start != computed[slots]
        if bad.any():
            i = int(np.argmax(bad))
            raise PlanError(f"{where}: {self._name(int(slots[i]))}: start_pos {int(start[i])}, "
                            f"but {int(computed[slots[i]])} tokens are computed")
        end = start + n
        bad = end > lengths[slots] * self.block_size
        if bad.any():
            i = int(np.argmax(bad))
            raise PlanError(f"{where}: {self._name(int(slots[i]))}: {int(lengths[slots[i]])} "
                            f"blocks cannot hold {int(end[i])} tokens")
        if len(end) and end.max() > self.max_model_len:
            raise PlanError(f"{where}: context {int(end.max())} exceeds the model's "
                            f"{self.max_model_len} positions")
        # Inputs are given tokens (a prefill), or the one token sampled last (a decode).
        given = end <= prefill[slots]
        decode = (n == 1) & (start == known[slots] - 1)
        if not (given | decode).all():
            i = int(np.argmax(~(given | decode)))
            raise PlanError(f"{where}: {self._name(int(slots[i]))}: tokens up to {int(end[i])} "
                            f"are not known (the actor knows {int(known[slots[i]])})")
        return end

    def _name(self, slot: int) -> str:
        return self.request_ids[slot] or f"slot {slot}"

    def _commit_changes(self, freed, new_slots, news, new_tokens, new_blocks, grow_slots, grow_blocks) -> None:
        live_freed = freed[self.live[freed]]
        self.blocks.release(live_freed)
        self.live[live_freed] = False
        self.failed[live_freed] = False
        for s in live_freed.tolist():
            self.request_ids[s] = self.sampling[s] = self.tokens[s] = None
        for slot, r, tokens, blocks in zip(new_slots.tolist(), news, new_tokens, new_blocks):
            self.blocks.assign(slot, blocks)
            self.live[slot] = True
            self.failed[slot] = False
            self.computed[slot] = 0
            self.known[slot] = self.prefill_len[slot] = len(tokens)
            self.prompt_len[slot] = r.prompt_len or len(tokens)
            self.last_token[slot] = tokens[-1]
            self.seed[slot] = request_seed(r.request_id)
            self.request_ids[slot], self.sampling[slot], self.tokens[slot] = r.request_id, r.sampling, tokens
        self.blocks.append(grow_slots, grow_blocks)

    def _materialize(self, rows: StepRows, end: np.ndarray) -> None:
        """Input ids, positions, KV slots and block tables of the rows."""
        n, start, slots = rows.num_tokens, rows.start_pos, rows.slots
        total = int(n.sum())
        offsets = np.cumsum(n) - n
        positions = np.arange(total, dtype=_I64) + np.repeat(start - offsets, n)
        ids = np.empty(total, dtype=_I64)
        given = end <= self.prefill_len[slots]
        ids[offsets[~given]] = self.last_token[slots[~given]]
        for i in np.flatnonzero(given).tolist():
            s, a, b = int(slots[i]), int(start[i]), int(end[i])
            ids[offsets[i] : offsets[i] + b - a] = self.tokens[s][a:b]
        rows.input_ids, rows.positions = ids, positions
        rows.slot_mapping = self.blocks.slot_mapping(np.repeat(slots, n), positions)
        rows.tables, rows.table_lens = self.blocks.rows(slots)

    # -- after the step ----------------------------------------------------------------------------
    def advance(self, rows: StepRows, sampled: np.ndarray, failed: np.ndarray | None = None) -> None:
        """The step computed its rows' tokens and sampled `sampled` (one per sampling row);
        `failed` (bool per row) marks rows that failed: their requests end, and the rows of
        them already planned are skipped (their input is never a failed row's -1)."""
        self.computed[rows.slots] += rows.num_tokens
        took = rows.slots[rows.sample]
        self.last_token[took] = np.maximum(sampled, 0)
        self.known[took] += 1
        if failed is not None and failed.any():
            self.failed[rows.slots[failed]] = True

    def failed_rows(self, rows: StepRows) -> np.ndarray:
        """Bool per row: the row's request failed in an earlier step."""
        return self.failed[rows.slots]


def request_seed(request_id: str) -> int:
    """A stable 63-bit number per request id (FNV-1a; Python's hash() differs per process)."""
    h = 0xCBF29CE484222325
    for byte in request_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
