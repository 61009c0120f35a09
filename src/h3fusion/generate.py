"""`h3fusion generate`: batched, resumable answers to prompts, one JSONL line per prompt.

Each output line is the input record plus ``response``. Lines are appended as batches finish, in
input order, so a killed run resumes after the last complete line (a truncated last line is cut
off and redone). Within a window of pending prompts, batches are formed by prompt length, which
keeps left-padding waste small; decoding itself is ``decoding.decode_batch`` (finished rows leave
the batch).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from h3fusion import runs
from h3fusion.costs import PeakMemory, system_param_counts
from h3fusion.data import format_prompt, prompt_text
from h3fusion.decoding import decode_batch
from h3fusion.errors import H3FusionError
from h3fusion.io import append_jsonl, read_jsonl, stage_writes, write_json, write_jsonl
from h3fusion.tokens import prompt_ids

WINDOW_BATCHES = 4  # prompts sorted by length within this many batches; bounds work lost to a kill (a resume starts
# on a window boundary, so the batches are an uninterrupted run's)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)] if positions else text).strip()


@torch.no_grad()
def generate_jsonl(
    model,
    tokenizer,
    records: Sequence[dict],
    output: str | Path,
    *,
    prompt_format: str = "alpaca",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 0.6,
    top_p: float = 1.0,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    log=print,
    earlier: dict | None = None,
    on_window: Callable[[dict], None] | None = None,
) -> dict:
    """Answer every record (resuming after the last complete line of ``output``); returns stats.

    ``earlier``: the stats an earlier, killed process reported for this file through ``on_window`` (called with the
    stats so far after each window's answers are on disk); they are added to this process's, so a kill keeps every
    recorded window's time and tokens in the totals (a window written but not yet recorded counts under
    ``resumed_after``, the answers on disk that ``prompts`` leaves out). Dropped when they are not such stats or the
    file does not hold the answers they count."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(output, repair=True) if output.exists() else []
    if len(done) > len(records):
        raise H3FusionError(f"{output} has {len(done)} answers but there are only {len(records)} prompts; "
                            "it belongs to another prompt set: move it away")
    check_answers(done, records, output)
    window = batch_size * WINDOW_BATCHES
    kept = len(done) - len(done) % window if len(done) < len(records) else len(done)
    if kept < len(done):
        # a writer killed part-way through a window's lines: resume at the window's start, so every later batch
        # holds the prompts an uninterrupted run's would (batch composition moves floats, and near-ties with them)
        log(f"[generate] {output.name}: resuming at answer {kept + 1}, the start of its window of {window} "
            f"({len(done) - kept} answer{'s' if len(done) - kept > 1 else ''} after it made again, as an uninterrupted "
            "run makes them)")
        write_jsonl(output, done[:kept])
        done = done[:kept]
    pending = list(range(len(done), len(records)))
    prompts = [format_prompt(*prompt_text(r, f"prompt {i + 1}"), prompt_format, tokenizer)
               for i, r in enumerate(records)]
    model.eval()
    stats = {"prompts": len(pending), "resumed_after": len(done), "new_tokens": 0, "seconds": 0.0}
    given, earlier = earlier, _earlier_part(earlier, len(done))
    if given is not None and earlier is None and on_window is not None:
        # the stale part is replaced now: left on disk until this process's first window is recorded, it could
        # pass for that window's part once the window is written (a kill between the two)
        on_window(_totals(None, {**stats, "prompts": 0}, 0.0))
    bar = None
    if progress and pending and os.environ.get("H3FUSION_NO_PROGRESS") != "1":  # as the Trainer's bars
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), initial=len(done), unit="prompt", desc=output.stem, dynamic_ncols=True)
    started = time.time()
    # about what the answers take on disk: each record again, plus ~4 bytes per new token
    need = sum(len(json.dumps(records[i], ensure_ascii=False)) + 4 * max_new_tokens for i in pending)
    for start in range(0, len(pending), window):
        chunk = pending[start:start + window]
        lengths = {i: len(prompt_ids(tokenizer, prompts[i])) for i in chunk}
        order = sorted(chunk, key=lengths.__getitem__, reverse=True)
        answers: dict[int, str] = {}
        for b in range(0, len(order), batch_size):
            batch_ids = order[b:b + batch_size]
            new = decode_batch(
                model, tokenizer, [prompts[i] for i in batch_ids], max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature, top_p=top_p,
                seed=seed + batch_ids[0],  # per-batch seed: a resumed run samples the same
                stop_strings=stop_strings, adapters=getattr(model, "ensemble_adapters", None),
            )
            for i, ids in zip(batch_ids, new, strict=True):
                stats["new_tokens"] += len(ids)
                answers[i] = cut_at_stops(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)
            if bar is not None:
                bar.update(len(batch_ids))
                bar.set_postfix(tok_s=f"{stats['new_tokens'] / max(time.time() - started, 1e-9):.1f}")
        with stage_writes(output, f"answering into {output.name}", need=need):  # a refused write: one line
            append_jsonl(output, [{**records[i], "response": answers[i]} for i in chunk])
        if on_window is not None:
            on_window(_totals(earlier, {**stats, "prompts": start + len(chunk)}, time.time() - started))
    if bar is not None:
        bar.close()
    return _totals(earlier, stats, time.time() - started)


def _earlier_part(earlier, on_disk: int) -> dict | None:
    """``earlier`` as the recorded part of the ``on_disk`` answers this process starts from: its prompts, tokens and
    seconds, the other answers on disk as ``resumed_after``. None when it is not such stats (an older or edited
    stats.json) or counts answers the file no longer holds (moved away, made again from the start, cut back to a
    window's start)."""
    def count(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    if not (isinstance(earlier, dict) and all(count(earlier.get(k)) for k in ("prompts", "resumed_after",
                                                                            "new_tokens", "seconds"))):
        return None
    if not 0 < earlier["resumed_after"] + earlier["prompts"] <= on_disk:
        return None
    return {"prompts": int(earlier["prompts"]), "resumed_after": on_disk - int(earlier["prompts"]),
            "new_tokens": int(earlier["new_tokens"]), "seconds": float(earlier["seconds"])}


def _totals(earlier: dict | None, stats: dict, seconds: float) -> dict:
    """This process's stats (``seconds`` so far) plus an earlier process's part (``_earlier_part``), as one part:
    prompts, tokens and seconds summed, ``resumed_after`` the answers on disk before this process that the earlier
    part does not count."""
    now = {**stats, "seconds": round(seconds, 2)}
    if earlier is not None:
        now = {"prompts": earlier["prompts"] + now["prompts"], "resumed_after": earlier["resumed_after"],
               "new_tokens": earlier["new_tokens"] + now["new_tokens"],
               "seconds": round(earlier["seconds"] + now["seconds"], 2)}
    now["tokens_per_second"] = round(now["new_tokens"] / now["seconds"], 2) if now["seconds"] else None
    return now


def evaluated_records(config, axis: str) -> list[dict]:
    """The evaluated records of an axis: the first ``evaluate.<axis>_n`` test records, or the dev records
    (``evaluate.split: dev``)."""
    from h3fusion.data import load_evaluated

    return load_evaluated(axis, config)


def generate_run(config, systems: Sequence[str] | None = None, axes: Sequence[str] | None = None,
                 log=print) -> Path:
    """Run mode: every evaluated prompt answered by each system of the run that generates (or those named);
    returns the run's generations directory."""
    from h3fusion.systems import generated_systems

    for name in systems or generated_systems(config):
        generate_system(config, name, axes, log=log)
    return runs.generations_dir(config)


def generate_system(config, system: str, axes: Sequence[str] | None = None, log=print) -> dict:
    """Answer every evaluated prompt of each axis with one system (resumable, skipped when complete).

    Writes ``<run>/generations/<system>/<axis>.jsonl``, ``stats.json`` (tokens/s per finished axis; ``partial``: an
    unfinished axis's so far; ``honest_mc``: the MC scoring's time; ``cost``: parameters and peak memory of the last
    run that generated), ``honest.mc.json``
    (TruthfulQA MC1/MC2) and, for MoE systems, ``<axis>.routing.json`` (see ``moe.routing``).
    """
    from h3fusion.systems import load_system

    out = runs.generated_dir(config, system)
    axes = list(axes or config.evaluated_axes)
    stats_path = runs.generation_stats_file(config, system)
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    todo = {axis: evaluated_records(config, axis) for axis in axes}
    # an axis is done once its stats are written, after its answers and routing: a kill in between (every
    # answer on disk, no routing yet) leaves it to do, and resuming then answers nothing and writes the rest
    todo = {axis: records for axis, records in todo.items()
            if not (_complete(runs.generated_file(config, system, axis), records) and axis in stats)}
    need_mc = "honest" in axes and not runs.mc_file(config, system).is_file()
    if not todo and not need_mc:
        log(f"[generate] {system}: complete, skipping")
        return stats
    # the answers' own refused writes name their file; this covers the small JSON files beside them
    with stage_writes(out, f"generating with {system}"):
        with PeakMemory(interval=0.05) as memory:  # weights + generation: the report's memory column
            model, tokenizer = load_system(config, system)
            _generate_axes(config, system, model, tokenizer, todo, stats, need_mc, log)
        stats["cost"] = {**system_param_counts(model), "peak_memory_bytes": memory.peak,
                         "peak_memory_exact": memory.exact}
        write_json(stats_path, stats)
    return stats


def _generate_axes(config, system: str, model, tokenizer, todo: dict, stats: dict, need_mc: bool, log) -> None:
    stats_path = runs.generation_stats_file(config, system)
    if need_mc:  # TruthfulQA MC1/MC2 need the model's log-likelihoods, so they are computed here
        from h3fusion.truthfulqa_mc import mc_scores

        log(f"[generate] {system} / honest: MC1/MC2 log-likelihoods")
        records = evaluated_records(config, "honest")
        started = time.time()
        write_json(runs.mc_file(config, system), mc_scores(model, tokenizer, records, config.data.prompt_format))
        stats[runs.MC_STATS] = {"questions": len(records), "seconds": round(time.time() - started, 2)}  # status's pace
        write_json(stats_path, stats)
    gen = config.generate
    if not isinstance(stats.get(runs.PARTIAL_STATS, {}), dict):
        stats.pop(runs.PARTIAL_STATS)  # not ours: nothing to carry over
    for axis in todo:
        stats.pop(axis, None)  # an entry of answers since moved away is not this axis's: it is finished when named again
    for axis, records in todo.items():
        log(f"[generate] {system} / {axis}: {len(records)} prompts")

        def so_far(part: dict, axis: str = axis) -> None:  # a kill keeps the finished windows' time and tokens
            stats.setdefault(runs.PARTIAL_STATS, {})[axis] = part
            write_json(stats_path, stats)

        stats[axis] = generate_jsonl(
            model, tokenizer, records, runs.generated_file(config, system, axis),
            prompt_format=config.data.prompt_format,
            max_new_tokens=gen.max_new_tokens.get(axis, 128), batch_size=gen.batch_size, do_sample=gen.do_sample,
            temperature=gen.temperature, top_p=gen.top_p, seed=config.seed, stop_strings=gen.stop_strings, log=log,
            earlier=stats.get(runs.PARTIAL_STATS, {}).get(axis), on_window=so_far,
        )
        if hasattr(model, "moe_layers"):
            from h3fusion.moe.routing import routing_stats

            prompts = [format_prompt(*prompt_text(r), config.data.prompt_format, tokenizer) for r in records]
            write_json(runs.routing_file(config, system, axis), routing_stats(model, tokenizer, {axis: prompts}))
        partial = stats.get(runs.PARTIAL_STATS, {})
        partial.pop(axis, None)
        if not partial:
            stats.pop(runs.PARTIAL_STATS, None)
        write_json(stats_path, stats)


def generate_prompt_file(model_spec: str, prompts: Path, output: Path, *, base: str | None = None,
                         expert_bias: dict[str, float] | None = None, prompt_format: str = "alpaca",
                         max_new_tokens: int = 128, batch_size: int = 8, do_sample: bool = False,
                         temperature: float = 0.6, seed: int = 0) -> dict:
    """Prompt-file mode: answer a JSONL of prompts with any model (a spec, a fused model dir or a PEFT adapter
    dir, merged into ``base``) into ``output``; ``expert_bias`` sets a fused model's router-logit bias per
    expert. Returns the generation stats."""
    from h3fusion.models import load_model

    records = read_jsonl(prompts)
    model, tokenizer = load_model(model_spec, base=base)
    if expert_bias:
        if not hasattr(model, "set_expert_bias"):
            raise H3FusionError(f"--expert-bias needs an h3fusion MoE model; {model_spec} is a {type(model).__name__}")
        try:
            model.set_expert_bias(expert_bias)
        except ValueError as error:
            raise H3FusionError(f"--expert-bias {expert_bias}: {error}; use name=number with names "
                                f"{model.expert_names}") from None
    return generate_jsonl(model, tokenizer, records, output, prompt_format=prompt_format,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                          temperature=temperature, seed=seed)


def check_answers(answers: Sequence[dict], records: Sequence[dict], path: Path) -> None:
    """Answer i must answer prompt i: a file written for another prompt set (the evaluated subset, the dev
    split or its data changed since) is refused, never resumed, skipped as complete or scored."""
    for i, (answer, record) in enumerate(zip(answers, records, strict=False)):  # fewer answers: a resume
        if prompt_text(answer, f"{path} line {i + 1}") != prompt_text(record, f"prompt {i + 1}"):
            raise H3FusionError(f"{path} line {i + 1} answers another prompt than prompt {i + 1} of this run's "
                                "evaluated set (the evaluated subset, the split or the data changed since): move "
                                "the file away and generate again")


def _complete(path: Path, records: Sequence[dict]) -> bool:
    """Every record answered, by the answers of these very prompts (``check_answers``)."""
    if not path.is_file():
        return False
    answers = read_jsonl(path, repair=True)
    check_answers(answers, records, path)
    return len(answers) >= len(records)
