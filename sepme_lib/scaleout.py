"""Top layer -- the paper-style evaluation table, sharded across processes (and GPUs) with accelerate.

``sepme evaluate`` (``cli.py``) calls :func:`evaluation_table`. The work -- every row (the original model, then
``theta + sum_{i in S} s_i dTheta_i`` for every non-empty subset ``S`` of the given deltas: the paper's Tables 3-5) x
every evaluated concept x its seeds -- is cut into fixed chunks of at most ``batch`` images (:func:`plan`). The cut
depends only on the table, never on the number of processes, so every chunk is computed exactly the same way
whether one process does all of them or ``N`` processes share them (chunk ``k`` goes to process ``k mod N``). The
main process gathers every chunk's labels and builds one table, identical to the single-process table for the same
seeds (``tests/test_scaleout.py`` checks it with two CPU processes).

Launch on GPUs: ``accelerate launch --multi_gpu --num_processes N -m sepme_lib evaluate ...`` (each process takes its
own GPU). On CPUs: ``accelerate launch --multi_gpu --num_processes N -m sepme_lib evaluate ... --device cpu`` (or
``torchrun --nproc_per_node N -m sepme_lib evaluate ...``): ``accelerate launch --cpu --num_processes N`` starts ONE
process unless MPI is set up (accelerate's CPU launcher), and this module says so when it sees that case.
Training (``sepme erase``) stays on one device: the frozen copy needs no gradients, so SD 1.x fits one GPU.
"""
from __future__ import annotations

import math
import os
import resource
import time
import warnings

import torch
from tqdm.auto import tqdm

from .concepts import concept_set
from .deltas import edited_weights
from .evaluate import subsets, summarise
from .report import markdown_table

TABLES = ("paper", "combination")


class Shard:
    """Which process this is: ``index`` of ``count``, its ``device``, and ``gather(list) -> list`` (the
    concatenation over processes on the main process; ``None`` elsewhere)."""

    def __init__(self, index: int = 0, count: int = 1, device=None, gather=None):
        self.index, self.count, self.device = index, count, device
        self._gather = gather

    @property
    def main(self) -> bool:
        return self.index == 0

    def gather(self, items: list):
        if self._gather is None:
            return list(items)
        out = self._gather(list(items))
        return out if self.main else None


def shard_from_environment(device: torch.device) -> Shard:
    """A :class:`Shard` of the current launch: several processes when started by ``accelerate launch`` (or
    ``torchrun``: ``WORLD_SIZE > 1``), else one. Each process takes accelerate's device (``cuda:<local rank>``) unless
    ``device`` is the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            warnings.warn("started by `accelerate launch --cpu`, which runs ONE process without MPI: for N CPU "
                          "processes use `accelerate launch --multi_gpu --num_processes N -m sepme_lib evaluate ... "
                          "--device cpu` (or torchrun --nproc_per_node N)", stacklevel=2)
        return Shard(0, 1, device)
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=device.type == "cpu")
    dev = torch.device("cpu") if device.type == "cpu" else state.device
    return Shard(state.process_index, state.num_processes, dev, gather_object)


def table_rows(deltas, scales, table: str = "paper") -> list[dict]:
    """The rows: ``original`` (no delta), then every non-empty subset of ``deltas`` at their ``scales`` (``"paper"``)
    or only all of them together (``"combination"``)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; use one of {TABLES}")
    names = [d.name for d in deltas]
    subs = subsets(names) if table == "paper" else ([names] if names else [])
    scale = dict(zip(names, scales))
    return [dict(subset=[], scales={})] + [dict(subset=s, scales={k: scale[k] for k in s}) for s in subs]


def plan(n_rows: int, concepts, n: int, batch: int = 16) -> list[tuple]:
    """Chunks ``(row, concept, first image, end)``: each concept's ``n`` images cut into ``ceil(n / batch)`` balanced
    blocks, for every row. Independent of the number of processes."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a whole number >= 1, got {batch!r}")
    blocks = math.ceil(n / batch)
    edges = [round(k * n / blocks) for k in range(blocks + 1)]
    return [(r, c, a, b) for r in range(n_rows) for c in concepts for a, b in zip(edges[:-1], edges[1:])]


def peak_memory(device) -> str:
    """Peak memory of this process: CUDA memory allocated on a GPU, else the CPU's peak resident set."""
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA (peak allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RAM (peak resident, CPU)"


@torch.no_grad()
def evaluation_table(model, judge, deltas, scales, concepts=None, n: int = 50, seed: int = 0, steps=None,
                     guidance=None, table: str = "paper", batch: int = 16, shard: Shard | None = None,
                     progress: bool = True) -> dict | None:
    """The paper-style ACC table of ``theta + sum_{i in S} s_i dTheta_i`` (every row of :func:`table_rows`) on
    ``concepts`` (default: the model's concept set's ``evaluate`` classes), ``n`` images per concept with seeds
    ``seed..seed+n-1`` (the same images in every row: the paper's 50 per concept), computed by this ``shard``'s
    chunks and gathered on the main process, which returns the table (other processes return ``None``)."""
    shard = shard or Shard(0, 1, model.device)
    cs = concept_set(model)
    concepts = list(concepts or cs.evaluate)
    rows = table_rows(deltas, scales, table)
    chunks = plan(len(rows), concepts, n, batch)
    mine = [k for k in range(len(chunks)) if k % shard.count == shard.index]
    by_name = {d.name: d for d in deltas}
    prompts = {c: cs.eval_prompts(c, n, seed) for c in concepts}
    t0, out, cached = time.time(), [], {}
    bar = tqdm(mine, desc=f"evaluate (process {shard.index + 1}/{shard.count})", disable=not (progress and shard.main))
    for k in bar:
        r, c, a, b = chunks[k]
        if r not in cached:  # the weights of one row at a time
            sub = rows[r]["subset"]
            cached = {r: edited_weights(model, [by_name[s] for s in sub], [rows[r]["scales"][s] for s in sub])
                      if sub else None}
        imgs = model.sample(prompts[c][a:b], seeds=range(seed + a, seed + b), steps=steps, guidance=guidance,
                            weights=cached[r])
        out.append((k, judge.predict(imgs)[cs.kind(c)]))
    gathered = shard.gather(out)
    memory = shard.gather([(shard.index, peak_memory(shard.device), round(time.time() - t0, 1))])
    if not shard.main:
        return None
    labels = dict(gathered)
    missing = [k for k in range(len(chunks)) if k not in labels]
    if missing:
        raise RuntimeError(f"{len(missing)} chunks were not computed by any process (first {chunks[missing[0]]})")
    preds = [{c: [] for c in concepts} for _ in rows]
    for k, (r, c, a, b) in enumerate(chunks):
        preds[r][c] += labels[k]
    accs = [{c: sum(p == c for p in preds[r][c]) / n for c in concepts} for r in range(len(rows))]
    body = [dict(subset=row["subset"], scales=row["scales"], acc=acc) for row, acc in zip(rows[1:], accs[1:])]
    return dict(model=model.name, family=model.family, table=table, concepts=concepts, images_per_concept=n,
                seed=seed, steps=steps or model.sample_steps, guidance=model.guidance if guidance is None else guidance,
                deltas=[dict(name=d.name, method=d.method, scale=s) for d, s in zip(deltas, scales)],
                original=accs[0], rows=body, summary=summarise(body, accs[0], list(by_name)),
                predictions=[{c: preds[r][c] for c in concepts} for r in range(len(rows))],
                run=dict(processes=shard.count, chunks=len(chunks), batch=batch, seconds=round(time.time() - t0, 1),
                         memory={f"process {i}": m for i, m, _ in sorted(memory)},
                         process_seconds={f"process {i}": s for i, _, s in sorted(memory)}))


def table_markdown(out: dict) -> str:
    """The table as markdown: one row per combination (scales shown when not 1), every concept's ACC, then the
    summary (worst erased ACC, worst others ratio, restoration drift)."""
    def label(row):
        if not row["subset"]:
            return "original"
        return " + ".join(k if v == 1 else f"{v:g}*{k}" for k, v in row["scales"].items())

    rows = [dict(model=label(dict(subset=[], scales={})), **out["original"])]
    rows += [dict(model=label(r), **r["acc"]) for r in out["rows"]]
    head = (f"ACC per concept ({out['images_per_concept']} images each, seeds {out['seed']}.."
            f"{out['seed'] + out['images_per_concept'] - 1}, {out['steps']} DDIM steps, guidance {out['guidance']:g}; "
            f"{out['model']})\n\n")
    summ = {k: v for k, v in out["summary"].items()}
    return head + markdown_table(rows, ["model"] + out["concepts"]) + "\n\n" + markdown_table([summ], list(summ))
