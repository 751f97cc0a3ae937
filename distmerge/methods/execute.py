"""The method protocol, written once and without Ray: reduction passes, then the merge, tensor by tensor,
chunk by chunk (or whole tensors, for methods that need them).

The engine's worker, the sweep's holders and the tests call these functions with their own tensor source (a
``read(tensor, start, stop) -> (base, experts)`` callable: the lazy checkpoint reader, or slices of tensors
held in memory) and their own sink (the streaming shard writer, or a dict). What a method adds beyond the
merged weights (artifacts such as EMR's unified vector and masks, deferred decisions such as TIES' zero-sign
patches) travels as typed fields of a ``ChunkResult``; the method itself says how its artifacts are laid out
and what its deferred decisions mean, so nothing here names a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from distmerge import dtypes
from distmerge.deferred import is_tensor, torch
from distmerge.errors import MergeError
from distmerge.ops import convert_fused

CHUNK_ELEMENTS = 1 << 18

# The state key through which ``merge_tensor`` tells a method that defers a decision the outcome the vote seen
# so far leans to (``MergeMethod.deferred_outcome``): the chunk is merged that way, and only the chunks whose
# lean the model-wide vote overturns are rewritten afterwards.
LEANING = "deferred_leaning"

Inputs = tuple["torch.Tensor | None", "list[torch.Tensor]"]
Reader = Callable[[Any, "int | None", "int | None"], Inputs]  # (OutputTensor, start row, stop row)


@dataclass
class Deferred:
    """A decision only the whole merged model can make: the chunk was merged as if its outcome were
    ``assumed``; ``vote`` is this chunk's share of the model-wide tally, and ``index`` (flat, within the chunk)
    / ``value`` the elements to rewrite should the method's ``settle_deferred`` decide the other outcome."""

    vote: int
    index: torch.Tensor
    value: torch.Tensor
    assumed: int = 1


@dataclass
class ChunkResult:
    """What a method's ``merge`` gives for one chunk."""

    merged: torch.Tensor
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)  # handed to the method's ArtifactStream
    deferred: Deferred | None = None
    # A summable share of a reduction only the finished merge needs (``MergeMethod.finish_merge``): computed
    # from the chunk the merge has in hand, it saves a pass that would read every input again. Keep it small
    # (EMR's is [2, T] floats): each layer group's sum travels as JSON in its shard's result and resume record.
    partial: dict[str, Any] | None = None
    # Flat indices (within the chunk) of elements merged provisionally: the caller keeps their inputs and the
    # method merges them again once every chunk is in (``finish``). Only for a caller that asked
    # (``MergeMethod.leaves_undecided``).
    undecided: torch.Tensor | None = None


class ArtifactStream(Protocol):
    """A method's artifacts of one tensor, turned chunk by chunk into ``(key, values)`` pieces written in the
    order the method's ``artifact_entries`` declare them (so a streaming writer never holds a whole tensor)."""

    def add(self, artifacts: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]: ...

    def finish(self) -> list[tuple[str, torch.Tensor]]: ...


class Sink(Protocol):
    def weights(self, tensor, offset: int, values: torch.Tensor) -> None: ...

    def artifact(self, key: str, values: torch.Tensor) -> None: ...


class WriterSink:
    """Streams into ``ShardWriter``s: the shard's, and the method's artifact file beside it (if any)."""

    def __init__(self, writer, artifact_writer=None):
        self.writer, self.artifact_writer = writer, artifact_writer

    def weights(self, tensor, offset, values):
        self.writer.write(tensor.name, values)

    def artifact(self, key, values):
        self.artifact_writer.write(key, values)


class DictSink:
    """Whole tensors in memory: merged weights by name, artifacts by key (pieces joined along rows)."""

    def __init__(self):
        self.outputs: dict[str, torch.Tensor] = {}
        self._pieces: dict[str, list[torch.Tensor]] = {}

    def weights(self, tensor, offset, values):
        if tensor.name not in self.outputs:
            self.outputs[tensor.name] = torch.empty(tuple(tensor.shape), dtype=values.dtype)
        flat = self.outputs[tensor.name].view(-1)
        flat[offset:offset + values.numel()] = values.reshape(-1)

    def artifact(self, key, values):
        self._pieces.setdefault(key, []).append(values)

    def artifacts(self) -> dict[str, torch.Tensor]:
        return {key: pieces[0] if len(pieces) == 1 else torch.cat(pieces) for key, pieces in self._pieces.items()}


class GrowingBuffer:
    """Values appended chunk by chunk into one buffer that doubles when full. A list of one small tensor per
    chunk, kept for the whole shard, split the heap around the chunks' freed temporaries so that they could
    not be reused: a worker's memory grew by ~5x what it kept (measured on global TIES)."""

    def __init__(self, dtype: torch.dtype):
        self.data = torch.empty(0, dtype=dtype)
        self.size = 0

    def extend(self, values: torch.Tensor) -> None:
        need = self.size + values.numel()
        if need > self.data.numel():
            grown = torch.empty(max(need, 2 * self.data.numel(), 1 << 12), dtype=self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:need] = values.reshape(-1)
        self.size = need

    def values(self) -> torch.Tensor:
        return self.data[:self.size]


MEMO_BYTES = 256 << 20  # what a process keeps between two reduction passes (TIES' irregular keys)


class PassMemo:
    """What a process keeps from one reduction pass for the next, within a byte budget: a method keeps a chunk's
    int32 rows (one per task) whole or not at all, and the next pass takes them instead of reading the chunk
    again. Rows go into fixed pages rather than a tensor per chunk (which fragments the heap, see
    ``GrowingBuffer``) or one doubling buffer (whose copy would hold three times the budget at once)."""

    PAGE = 1 << 20  # int32 values per page (4 MiB)

    def __init__(self, budget_bytes: int = MEMO_BYTES):
        self.budget = budget_bytes
        self.accepting = True  # False once a chunk did not fit: later chunks need not be offered
        self._pages: list[torch.Tensor] = []
        self._size = 0
        self._entries: dict[Any, tuple[int, tuple[int, ...]]] = {}  # key -> (first value, length of each row)

    @property
    def nbytes(self) -> int:
        return self._size * 4

    def keep(self, key: Any, rows: list[torch.Tensor]) -> bool:
        lengths = tuple(r.numel() for r in rows)
        if (self._size + sum(lengths)) * 4 > self.budget:
            self.accepting = False
            return False
        start = self._size
        for row in rows:
            self._append(row.reshape(-1).to(torch.int32))
        self._entries[key] = (start, lengths)
        return True

    def kept(self, key: Any) -> list[torch.Tensor] | None:
        if key not in self._entries:
            return None
        start, lengths = self._entries[key]
        rows = []
        for length in lengths:
            rows.append(self._read(start, length))
            start += length
        return rows

    def clear(self) -> None:
        self._pages, self._size, self._entries, self.accepting = [], 0, {}, True

    def _append(self, values: torch.Tensor) -> None:
        done = 0
        while done < values.numel():
            page, at = divmod(self._size, self.PAGE)
            if page == len(self._pages):
                self._pages.append(torch.empty(self.PAGE, dtype=torch.int32))
            step = min(self.PAGE - at, values.numel() - done)
            self._pages[page][at:at + step] = values[done:done + step]
            done += step
            self._size += step

    def _read(self, start: int, length: int) -> torch.Tensor:
        pieces = []
        while length > 0:
            page, at = divmod(start, self.PAGE)
            step = min(self.PAGE - at, length)
            pieces.append(self._pages[page][at:at + step])
            start += step
            length -= step
        if len(pieces) == 1:
            return pieces[0]
        return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)


@dataclass
class DeferredLog:
    """The deferred decisions of the tensors merged so far: the summed vote and, by the outcome their chunk
    assumed, the elements to rewrite should the model-wide decision be another. ``prior``: the vote of what the
    same process merged before this log began (its earlier shards), which the chunks' lean counts too."""

    vote: int = 0
    prior: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # deferred elements by assumed outcome
    patches: dict[int, dict[str, tuple[GrowingBuffer, GrowingBuffer]]] = field(default_factory=dict)

    def add(self, name: str, offset: int, deferred: Deferred, out_dtype: torch.dtype, numel: int) -> None:
        """A chunk's deferred elements, ``offset`` its first flat element in a tensor of ``numel``."""
        self.vote += int(deferred.vote)
        if deferred.index.numel():
            # int32 indices where they reach: bf16 fine-tunes defer some % of all elements (exact cancellations),
            # and the patch files are written, hashed and held per shard
            index_dtype = torch.int32 if numel <= 2**31 else torch.int64
            index, value = self.patches.setdefault(deferred.assumed, {}).setdefault(
                name, (GrowingBuffer(index_dtype), GrowingBuffer(out_dtype)))
            index.extend(deferred.index.cpu() + offset)
            value.extend(deferred.value.to("cpu", out_dtype))
            self.counts[deferred.assumed] = self.counts.get(deferred.assumed, 0) + deferred.index.numel()

    @property
    def count(self) -> int:
        """Deferred elements recorded, whichever outcome they assumed."""
        return sum(self.counts.values())

    def next(self) -> DeferredLog:
        """An empty log for what this process merges next, leaning as this one ended."""
        return DeferredLog(prior=self.prior + self.vote)

    def joined(self, assumed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{tensor: (flat indices, values)} of the elements merged as ``assumed``, as ``patch_safetensors``
        takes them."""
        return {name: (index.values(), value.values())
                for name, (index, value) in self.patches.get(assumed, {}).items()}

    def apply(self, outputs: dict[str, torch.Tensor], outcome: int | None) -> int:
        """Rewrite, in whole tensors held in memory, the elements merged as another outcome than ``outcome``
        (None: no decision, nothing to rewrite); how many."""
        count = 0
        for assumed in self.patches:
            if outcome is None or assumed == outcome:
                continue
            for name, (index, value) in self.joined(assumed).items():
                outputs[name].view(-1)[index] = value
                count += index.numel()
        return count


def patch_key(tensor: str, part: str, assumed: int) -> str:
    """A key of a shard's deferred patch file: ``{tensor}::{part}`` (part ``index`` or ``value``) for elements
    merged as outcome 1 (the only kind such files held before chunks leaned), ``{tensor}::{part}@{assumed}``
    otherwise."""
    return f"{tensor}::{part}" if assumed == 1 else f"{tensor}::{part}@{assumed}"


def parse_patch_key(key: str) -> tuple[str, str, int]:
    """(tensor, part, assumed) of a ``patch_key``."""
    tensor, part = key.rsplit("::", 1)
    part, _, assumed = part.partition("@")
    return tensor, part, int(assumed or 1)


@dataclass
class UndecidedLog:
    """The undecided elements of the tensors merged so far, with their inputs as read: {tensor: (flat indices,
    base values, each expert's values)}."""

    entries: dict[str, tuple[GrowingBuffer, GrowingBuffer, list[GrowingBuffer]]] = field(default_factory=dict)

    def add(self, name: str, offset: int, index: torch.Tensor, base: torch.Tensor, experts: list[torch.Tensor],
            numel: int) -> None:
        if not index.numel():
            return
        index_dtype = torch.int32 if numel <= 2**31 else torch.int64
        held = self.entries.setdefault(name, (GrowingBuffer(index_dtype), GrowingBuffer(base.dtype),
                                              [GrowingBuffer(e.dtype) for e in experts]))
        held[0].extend(index + offset)
        held[1].extend(base.reshape(-1)[index])
        for buffer, expert in zip(held[2], experts):
            buffer.extend(expert.reshape(-1)[index])

    def tensors(self) -> dict[str, torch.Tensor]:
        """As a file holds them: ``<tensor>::index``, ``<tensor>::base``, ``<tensor>::<t>`` (``undecided_groups``)."""
        out = {}
        for name, (index, base, experts) in self.entries.items():
            out[f"{name}::index"] = index.values()
            out[f"{name}::base"] = base.values()
            for t, expert in enumerate(experts):
                out[f"{name}::{t}"] = expert.values()
        return out


def undecided_groups(keys, get: Callable[[str], torch.Tensor]):
    """(tensor, flat indices, base values, experts' values) of each tensor in an ``UndecidedLog.tensors()``
    layout (``keys`` its names, ``get`` one of its tensors: a file is read a tensor at a time)."""
    keys = set(keys)
    for name in sorted(k[:-len("::index")] for k in keys if k.endswith("::index")):
        experts = []
        while f"{name}::{len(experts)}" in keys:
            experts.append(get(f"{name}::{len(experts)}"))
        yield name, get(f"{name}::index"), get(f"{name}::base"), experts


# --- chunks -------------------------------------------------------------------------------------------
def row_elements(tensor) -> int:
    count = 1
    for size in tensor.shape[1:]:
        count *= size
    return count


def row_chunks(tensor, chunked: bool, chunk_elements: int = CHUNK_ELEMENTS) -> list[tuple[int | None, int | None]]:
    """Row ranges of about ``chunk_elements`` elements, or the whole tensor as (None, None)."""
    if not tensor.shape or not chunked:
        return [(None, None)]
    rows = max(1, chunk_elements // max(1, row_elements(tensor)))
    return [(a, min(a + rows, tensor.shape[0])) for a in range(0, tensor.shape[0], rows)]


# (tensor, chunkable) -> row ranges; tests pass smaller chunks than the engine's
Chunker = Callable[[Any, bool], "list[tuple[int | None, int | None]]"]


def chunk_offset(tensor, start: int | None) -> int:
    """The chunk's first flat element (what counter-based masks and deferred indices are keyed by)."""
    return 0 if start is None else start * row_elements(tensor)


def add_partials(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    if total is None:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in part.items()}
    for key, value in part.items():
        total[key] = total[key] + value
    return total


def partial_to_json(partial: dict[str, Any]) -> dict[str, Any]:
    """A partial as JSON (a shard's result, kept in its manifest record for a resume): each tensor as its dtype,
    shape and values. Exact: JSON writes a float as the shortest text that reads back as the same double."""
    out: dict[str, Any] = {}
    for key, value in partial.items():
        if is_tensor(value):
            out[key] = {"dtype": dtypes.name_of(value.dtype), "shape": list(value.shape),
                        "values": value.detach().cpu().reshape(-1).tolist()}
        elif type(value) in (int, float):
            out[key] = value
        else:
            raise TypeError(f"merge partial '{key}': a {type(value).__name__} is neither a tensor nor a number")
    return out


def partial_from_json(document: Any) -> dict[str, Any]:
    """``partial_to_json``'s partial; a ValueError for anything it would not have written."""
    if not isinstance(document, dict):
        raise ValueError("a merge partial is not a mapping")
    out: dict[str, Any] = {}
    for key, value in document.items():
        if type(value) in (int, float):
            out[key] = value
            continue
        if not isinstance(value, dict) or set(value) != {"dtype", "shape", "values"} \
                or value["dtype"] not in dtypes.ITEMSIZE or not isinstance(value["shape"], list) \
                or not all(type(s) is int and s >= 0 for s in value["shape"]) \
                or not isinstance(value["values"], list) or not all(type(v) in (int, float) for v in value["values"]):
            raise ValueError(f"merge partial '{key}' is not a tensor record")
        if len(value["values"]) != math.prod(value["shape"]):
            raise ValueError(f"merge partial '{key}' has {len(value['values'])} values for shape {value['shape']}")
        out[key] = torch.tensor(value["values"], dtype=dtypes.torch_dtype(value["dtype"])).reshape(value["shape"])
    return out


# --- finite checks ------------------------------------------------------------------------------------
def is_finite(value: torch.Tensor) -> bool:
    """No NaN or Inf. The sum is one cheap pass, finite for almost every tensor (accumulated in float32, so a
    float16 chunk's sum does not overflow); only when it is not is the element-wise check run to be sure."""
    if not value.is_floating_point():
        return True
    return bool(torch.isfinite(value.sum(dtype=torch.float32))) or bool(torch.isfinite(value).all())


def converted(value: torch.Tensor, device, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(``value`` on ``device`` in ``dtype`` where it is floating point, whether that is free of NaN/Inf):
    bf16 <-> float32 on the CPU in one compiled pass, anything else as torch's conversion and ``is_finite``.
    Where the verdict is False the converted values are unspecified (the compiled narrowing can turn a NaN into
    a zero): a caller must stop on it, as both callers do."""
    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
        if value.dtype == dtype == torch.bfloat16:
            finite = convert_fused.bfloat16_finite(value)
            if finite is not None:
                return value, finite
        fused = convert_fused.to_float32(value) if dtype == torch.float32 else convert_fused.to_bfloat16(value)
        if fused is not None:
            return fused
    value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value, is_finite(value)


def check_finite_output(tensor: str, value: torch.Tensor, method: str, finite: bool | None = None) -> None:
    """A merged chunk with NaN/Inf (from parameters, an overflow in the output dtype, anything) stops the run
    before it reaches a shard (``finite``: already known from the conversion)."""
    if not (is_finite(value) if finite is None else finite):
        raise MergeError(f"tensor '{tensor}': the {method} merge gives NaN or Inf in {str(value.dtype).removeprefix('torch.')} "
                         f"(check the parameters, and out_dtype's range)")


# --- the protocol -------------------------------------------------------------------------------------
def pass_partial(method, pass_name: str, state: dict, tensors, read: Reader, chunker: Chunker = row_chunks,
                 memo: PassMemo | None = None) -> dict[str, Any] | None:
    """The summed partial of one reduction pass over ``tensors`` (the merged ones of a layer group, a holder);
    with a ``memo``, a chunk an earlier pass kept enough of in this process is not read again."""
    chunked = method.chunkable()
    totals = None
    for tensor in tensors:
        for start, stop in chunker(tensor, chunked):
            offset = chunk_offset(tensor, start)
            if memo is not None:
                remembered = method.stats_from_memo(totals, pass_name, tensor.job, offset, state, memo)
                if remembered is not None:
                    totals = remembered
                    continue
            base, experts = read(tensor, start, stop)
            totals = method.add_stats(totals, pass_name, base, experts, tensor.job, offset, state, memo)
    return totals


def run_passes(method, state: dict, partial: Callable[[str, dict], "dict[str, Any] | None"]) -> dict:
    """Every reduction pass the method asks for; ``partial(pass_name, state)`` sums one pass over the model
    (one process, or all actors)."""
    while (pass_name := method.next_pass(state)) is not None:
        state = method.finish_pass(pass_name, partial(pass_name, state) or {}, state)
    return state


def merge_tensor(method, tensor, state: dict, read: Reader, sink: Sink, deferred: DeferredLog,
                 artifact_dtype: torch.dtype, chunker: Chunker = row_chunks,
                 totals: dict[str, Any] | None = None, undecided: UndecidedLog | None = None) -> dict[str, Any] | None:
    """Merge one tensor into ``sink``: weights (checked finite, in the output dtype), the method's artifacts
    through its stream, deferred decisions into ``deferred``, undecided elements' inputs into ``undecided``.
    Returns ``totals`` with the chunks' partials (``ChunkResult.partial``) added in chunk order, as a pass over
    the same tensor would add them."""
    stream = method.artifact_stream(tensor, artifact_dtype) if method.artifact_folder else None
    for start, stop in chunker(tensor, method.chunkable()):
        base, experts = read(tensor, start, stop)
        offset = chunk_offset(tensor, start)
        leaning = method.deferred_outcome(deferred.prior + deferred.vote)
        result = method.merge(base, experts, tensor.job, offset,
                              state if leaning is None else {**state, LEANING: leaning})
        merged, finite = converted(result.merged, "cpu", dtypes.torch_dtype(tensor.out_dtype))
        check_finite_output(tensor.name, merged, method.name, finite)
        if result.deferred is not None:
            deferred.add(tensor.name, offset, result.deferred, dtypes.torch_dtype(tensor.out_dtype),
                         math.prod(tensor.shape))
        if result.partial is not None:
            totals = add_partials(totals, result.partial)
        if result.undecided is not None:
            if undecided is None:
                raise RuntimeError(f"{method.name} left elements undecided for a caller that cannot place them")
            undecided.add(tensor.name, offset, result.undecided, base, experts, math.prod(tensor.shape))
        if stream is not None:
            for key, values in stream.add(result.artifacts):
                sink.artifact(key, values)
        sink.weights(tensor, offset, merged)
    if stream is not None:
        for key, values in stream.finish():
            sink.artifact(key, values)
    return totals


def artifact_entries(method, tensors, artifact_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple]]:
    """The artifact file's (key, dtype, shape) in write order, for the merged ``tensors`` of a shard."""
    if not method.artifact_folder:
        return []
    return [entry for tensor in tensors if tensor.merged for entry in method.artifact_entries(tensor, artifact_dtype)]


class Shard(Protocol):
    """What ``finish`` needs of one part of the output (a shard file, or the tensors held in memory)."""

    def undecided(self):
        """Its undecided elements, as ``undecided_groups`` gives them."""

    def patch(self, decided: dict[str, tuple[torch.Tensor, torch.Tensor]], outcome: int | None) -> int:
        """Rewrite the decided elements ({tensor: (flat indices, values)}) and its own deferred elements that
        were merged as another outcome than ``outcome``; returns how many deferred elements it holds."""


def finish(method, state: dict, totals: dict[str, Any], vote: int, shards: list[Shard],
           tensors: dict[str, Any]) -> tuple[dict, dict | None]:
    """After every chunk is merged: the method's summed partials, its passes over the undecided elements and
    their merge, then its deferred decisions on the model-wide ``vote`` (the chunks' share of it). Returns
    (final state, None), or (state, the initial state of a merge to run again) where the method says so
    (``merge_again``). ``tensors``: the merged ``OutputTensor``s by name (the jobs and dtypes)."""
    state = method.finish_merge(totals, state)

    def over_undecided(pass_name: str, state: dict) -> dict[str, Any] | None:
        totals = None
        for shard in shards:
            for name, _, base, experts in shard.undecided():
                totals = method.add_stats(totals, pass_name, _float32(base), [_float32(e) for e in experts],
                                          tensors[name].job, 0, state)
        return totals

    state = run_passes(method, state, over_undecided)
    again = method.merge_again(state)
    if again is not None:
        return state, again
    # the decided elements' share of the vote first: whether the deferred elements change depends on it
    for shard in shards:
        for name, _, base, experts in shard.undecided():
            vote += _decided(method, state, tensors[name], base, experts)[1]
    state, outcome = method.settle_deferred(state, vote)
    settled = state if outcome is None else {**state, LEANING: outcome}  # the decided elements merge as decided
    count = 0
    for shard in shards:
        decided = {}
        for name, index, base, experts in shard.undecided():
            values, _, deferred, _ = _decided(method, settled, tensors[name], base, experts)
            count += deferred.numel()  # not among the shard's own deferred elements
            decided[name] = (index, values)
        count += shard.patch(decided, outcome)
    if outcome is not None:
        state = method.record_settled(state, count)
    return state, None


def _float32(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float32)


def _decided(method, state: dict, tensor, base: torch.Tensor, experts: list[torch.Tensor]):
    """Undecided elements merged as a chunk of their own (each element's merge is its own): (values in the
    output dtype, their vote, positions of the deferred ones among them, their alternative values)."""
    result = method.merge(_float32(base), [_float32(e) for e in experts], tensor.job, 0, state)
    out_dtype = dtypes.torch_dtype(tensor.out_dtype)
    values, finite = converted(result.merged, "cpu", out_dtype)
    check_finite_output(tensor.name, values, method.name, finite)
    if result.deferred is None:
        return values, 0, torch.empty(0, dtype=torch.int64), values[:0]
    deferred = result.deferred
    return values, int(deferred.vote), deferred.index, deferred.value.to("cpu", out_dtype)


class _HeldShard:
    """``finish``'s view of tensors merged in memory."""

    def __init__(self, outputs: dict[str, torch.Tensor], deferred: DeferredLog, undecided: UndecidedLog):
        self.outputs, self.deferred, self.held = outputs, deferred, undecided.tensors()

    def undecided(self):
        return undecided_groups(self.held, self.held.__getitem__)

    def patch(self, decided, outcome):
        for name, (index, values) in decided.items():
            self.outputs[name].view(-1)[index.long()] = values
        self.deferred.apply(self.outputs, outcome)
        return self.deferred.count


def merge_in_memory(method, tensors, read: Reader, artifact_dtype: str | torch.dtype = "float32",
                    chunker: Chunker = row_chunks, leave_undecided: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """The whole protocol in one process (tests, small models): (merged weights, artifacts, final state).
    ``leave_undecided``: let the method leave elements undecided (``MergeMethod.leaves_undecided``); only for
    a float32 merge on the CPU, as the engine asks it."""
    artifact_dtype = dtypes.torch_dtype(artifact_dtype)
    merged = [t for t in tensors if t.merged]
    state = method.initial_state([t.job for t in merged])
    if leave_undecided:
        state = method.leaves_undecided(state)
    memo = PassMemo()
    while True:
        state = run_passes(method, state, lambda name, s: pass_partial(method, name, s, merged, read, chunker, memo))
        memo.clear()
        sink, deferred, undecided = DictSink(), DeferredLog(), UndecidedLog()
        totals = None
        for tensor in merged:
            totals = merge_tensor(method, tensor, state, read, sink, deferred, artifact_dtype, chunker, totals,
                                  undecided)
        state, again = finish(method, state, totals or {}, deferred.vote,
                              [_HeldShard(sink.outputs, deferred, undecided)], {t.name: t for t in merged})
        if again is None:
            return sink.outputs, sink.artifacts(), state
        state = again


def merge_tensor_dicts(method, base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]],
                       given: list[dict[str, Any]] | None = None, out_dtype: str | torch.dtype = "float32",
                       chunker: Chunker = row_chunks, leave_undecided: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``merge_in_memory`` on tensors held in dicts (name -> tensor, every tensor merged, one job each); the
    experts are models e0, e1, ... with per-model settings ``given``. Returns (merged weights, final state)."""
    from distmerge.methods.base import TensorJob, resolve_job_settings
    from distmerge.tensors import OutputTensor

    given = given or [{} for _ in experts]
    tensors = []
    for name in sorted(base):
        per_model, per_tensor = resolve_job_settings(method, name, 0.0, given)
        weights = per_model.pop("weight")
        job = TensorJob(name=name, numel=base[name].numel(), model_names=tuple(f"e{i}" for i in range(len(experts))),
                        weights=weights, per_model=per_model, per_tensor=per_tensor)
        tensors.append(OutputTensor(name=name, shape=tuple(base[name].shape), out_dtype=dtypes.name_of(out_dtype),
                                    merged=True, base=None, experts=(), job=job, group=name, layer=None))

    def read(tensor, start, stop):
        cut = (lambda v: v) if start is None else (lambda v: v[start:stop])
        return cut(base[tensor.name]), [cut(e[tensor.name]) for e in experts]

    merged, _, state = merge_in_memory(method, tensors, read, "float32", chunker, leave_undecided)
    return merged, state
