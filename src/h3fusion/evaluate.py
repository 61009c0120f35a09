"""`h3fusion evaluate`: judges over every system's generations -> ``<run>/results.json``.

Per system and axis, the rates its spec defines (``h3fusion.axes``): helpful win rate (mean
P(answer preferred over text-davinci-003)), harmless flagged rate (share with P(harmful) > 0.5),
honest truthful / informative / truthful·informative rates (P > 0.5) plus MC1/MC2 from
``honest.mc.json``; and hhh = mean(win_rate, 1 - flagged_rate, truthful_informative) (``axes.hhh``).
Each rate also comes corrected for its judge's measured error
(``<key>_corrected``, see ``rates``), with 95% bootstrap intervals (``<key>_ci`` over prompts,
``<key>_corrected_ci`` over prompts and the judge's validation set). Per axis: the answers' mean
length in words and their refusal rate (``refusal``). A run evaluated on more prompts than the
paper's protocol (first 50 / 500 / all 409) also gets the paper-protocol figures on those prefixes.
Judges report their held-out validation figures next to the scores, and the embedding-drift
diagnostic (the paper's "distance to alignment embeddings") is added per axis. Each system's
judgements are cached in ``<run>/judgements/<system>/<axis>.jsonl``; the answers of the systems it
assembles from the experts' (ensemble-rerank, oracle-routed) are written to ``<run>/assembled/<system>/``
(``runs`` names every file).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from h3fusion import runs
from h3fusion.axes import axis_spec, hhh_of
from h3fusion.config import RunConfig
from h3fusion.data import prompt_text
from h3fusion.errors import H3FusionError
from h3fusion.generate import check_answers, evaluated_records
from h3fusion.io import append_jsonl, read_jsonl, write_json, write_jsonl
from h3fusion.rates import AxisRates, axis_rates, point_rates, replicate_rates
from h3fusion.refusal import refusal_rate
from h3fusion.stats import percentile_interval


def load_axis_judges(config: RunConfig, axes: Sequence[str], log=print, cross_fit: bool = True) -> dict:
    """The judge of each axis as the config selects it (offline stand-ins unless told otherwise).
    ``cross_fit=False``: one offline judge per axis even where the run's are cross-fitted (users' own files)."""
    from h3fusion.judges import load_judges

    choice = {axis: getattr(config.judges, axis, "offline") for axis in axes}  # judges.<axis>
    offline = [axis for axis in axes if choice[axis] == "offline"]
    judges = load_judges(config, config.judges.cache_dir, log, offline, config.judges.fit_max_rows,
                         cross_fit=cross_fit) if offline else {}
    for axis in axes:
        if choice[axis] != "offline":
            judges[axis] = axis_spec(axis).external[choice[axis]](config)
    return judges


def judge_records(axis: str, judge, records: list[dict]) -> list[dict]:
    """Each record plus ``score`` (probability) and ``label`` (win / flagged / truthful+informative)."""
    return axis_spec(axis).judge_records(judge, records)


def embedding_drift(records: list[dict], references: list[str | None], embedder) -> dict:
    """Mean cosine distance between MiniLM embeddings of the answers and of the axis's reference
    answers (davinci-003 / a labelled safe BeaverTails answer / TruthfulQA's best answer)."""
    pairs = [(r["response"], ref) for r, ref in zip(records, references, strict=True) if ref]
    if not pairs:
        return {"cosine_distance": None, "n": 0}
    answers = embedder.encode([a for a, _ in pairs], "answers")
    refs = embedder.encode([b for _, b in pairs], "references")
    cosine = (answers * refs).sum(axis=1)  # the embedder returns unit vectors
    return {"cosine_distance": float(1 - cosine.mean()), "n": len(pairs)}


def run_provenance(config: RunConfig) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    data = config.data_dir()
    digests = {}
    if data is not None and data.is_dir():
        for path in sorted(p for p in data.rglob("*") if p.is_file() and p.suffix != ".md"):
            digests[str(path.relative_to(data))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"git_commit": commit, "config": config.model_dump(mode="json"), "seed": config.seed,
            "data_sha256": digests or "hub datasets (no local files)"}


def evaluate_run(config: RunConfig, systems: Sequence[str] | None = None, log=print) -> Path:
    """Score every system that has generations; write ``<run>/results.json`` (atomically).

    With ``systems`` named, only those are (re)scored and merged into the existing results.json:
    the other systems' entries are kept when they were scored on the same test subsets by the same
    judges, and dropped (with a log line) otherwise, so the file never mixes incomparable numbers.
    """
    from h3fusion.baselines.ensembles import RERANK
    from h3fusion.baselines.oracle import ORACLE
    from h3fusion.judges.embedder import Embedder
    from h3fusion.systems import assembled_systems

    gen_root = runs.generations_dir(config)
    assembled = assembled_systems()
    available = sorted(p.name for p in gen_root.iterdir() if p.is_dir() and p.name not in assembled) \
        if gen_root.is_dir() else []
    experts = [f"expert-{axis}" for axis in config.experts]
    if all(e in available for e in experts):  # assembled from the experts' judged answers, after them
        available += [RERANK] if "rerank" in config.baselines.ensembles else []
        available.append(ORACLE)
    explicit = bool(systems)
    systems = list(systems or available)
    if not systems:
        raise H3FusionError(f"no generations under {gen_root}; run `h3fusion generate` first")
    axes = config.evaluated_axes
    # dev prompts are none of the evaluated test prompts: one judge per axis scores them, not the test folds'
    judges = load_axis_judges(config, axes, log, cross_fit=config.evaluate.split == "test")
    embedder = Embedder()
    # every system answers the same prompts: look their reference answers up once per axis
    test_records = {axis: evaluated_records(config, axis) for axis in axes}  # loaded once per axis
    references = {axis: axis_spec(axis).references(config, records) for axis, records in test_records.items()}
    out = runs.results_file(config)
    judge_figures = {axis: _judge_figures(axis, judges[axis]) for axis in axes}
    rates = {axis: axis_rates(axis, judge_figures[axis]["validation"]) for axis in axes}
    for axis in axes:
        judge_figures[axis]["error"] = rates[axis].error_summary()
    kept = _comparable_entries(out, config, judge_figures, log) if explicit else {}
    results: dict = {"systems": {}, "judges": {}, "run": run_provenance(config)}
    protocol = paper_protocol_sizes(config)
    for system in systems:
        judged_by_axis = {}
        for axis in axes:
            if system == RERANK:
                judged = _rerank_axis(config, axis, judges[axis], experts, test_records[axis])
            elif system == ORACLE:
                judged = _oracle_axis(config, axis, judges[axis], test_records[axis])
            else:
                judged = _judged(config, system, axis, judges[axis], test_records[axis])
            judged_by_axis[axis] = judged
        entry = system_entry(judged_by_axis, rates, config.seed, protocol)
        for axis, judged in judged_by_axis.items():
            records = [{k: v for k, v in r.items() if k not in ("score", "label")} for r in judged]
            entry[axis]["embedding_drift"] = embedding_drift(records, references[axis], embedder)
        for axis in axes:  # an axis's multiple-choice figures, where its generate stage computed them
            mc_path = runs.mc_file(config, _answered_by(system, axis), axis)
            if mc_path.is_file():
                mc = json.loads(mc_path.read_text())
                entry[axis].update(mc1=mc["mc1"], mc2=mc["mc2"])
        results["systems"][system] = entry
        log(f"[evaluate] {system}: " + ", ".join(_summary(axis, entry[axis]) for axis in axes)
            + (f", hhh {entry['hhh']:.3f}" if entry["hhh"] is not None else "")
            + (f" (judge-corrected {entry['hhh_corrected']:.3f})" if entry.get("hhh_corrected") is not None else ""))
    if kept:  # the earlier entries of the other systems, all in generation order
        merged = {**kept, **results["systems"]}
        order = [s for s in available if s in merged] + [s for s in merged if s not in available]
        results["systems"] = {s: merged[s] for s in order}
    results["judges"] = judge_figures
    write_json(out, results)
    return out


def system_entry(judged_by_axis: dict[str, list[dict]], rates: dict[str, AxisRates], seed: int,
                 protocol: dict[str, int] | None = None) -> dict:
    """A system's results.json entry from its judged answers per axis: the rates (raw and judge-corrected, with
    intervals), answer length and refusals, hhh; plus ``paper_protocol``, the same on the paper's prefixes, when
    ``protocol`` names the axes this run evaluates more of (see ``paper_protocol_sizes``)."""
    entry: dict = {axis: {**axis_spec(axis).metrics(judged), **answer_stats(judged)}
                   for axis, judged in judged_by_axis.items()}
    entry["hhh"] = hhh_of(entry)  # mean(win_rate, 1 - flagged_rate, truthful_informative); None unless all scored
    entry.update(study_rates(rates, judged_by_axis, entry, seed))
    if protocol:
        prefixes = {axis: judged[: protocol.get(axis, len(judged))] for axis, judged in judged_by_axis.items()}
        entry["paper_protocol"] = system_entry(prefixes, rates, seed)
    return entry


def answer_stats(records: Sequence[dict]) -> dict:
    """The answers' mean length in words (the helpful judge, like GPT-4, prefers longer answers) and the share
    that refuse (``refusal.is_refusal``); computed alike for every axis."""
    responses = [str(r.get("response") or "") for r in records]
    return {"mean_words": sum(len(r.split()) for r in responses) / len(responses) if responses else None,
            "refusal_rate": refusal_rate(responses)}


def study_rates(rates: dict[str, AxisRates], judged_by_axis: dict[str, list[dict]], entry: dict, seed: int) -> dict:
    """Adds to each axis of ``entry`` its rates corrected for the judge's error and the 95% bootstrap intervals of
    raw and corrected rates; returns the hhh figures (``hhh_ci``, ``hhh_corrected``, ``hhh_corrected_ci``)."""
    replicates, corrected = {}, {}
    for axis, judged in judged_by_axis.items():
        observations = rates[axis].observe(judged)
        point = point_rates(rates[axis], observations)
        replicates[axis] = replicate_rates(rates[axis], observations, seed)
        for key in rates[axis].keys:
            entry[axis][f"{key}_ci"] = _interval(replicates[axis]["raw"][key])
            entry[axis][f"{key}_corrected"] = point[f"{key}_corrected"]
            entry[axis][f"{key}_corrected_ci"] = (_interval(replicates[axis]["corrected"][key])
                                                  if replicates[axis]["corrected"] else None)
        corrected[axis] = {key: point[f"{key}_corrected"] for key in rates[axis].keys}
    raw_hhh = hhh_of({axis: r["raw"] for axis, r in replicates.items()})
    corrected_hhh = hhh_of({axis: r["corrected"] for axis, r in replicates.items()})
    return {"hhh_ci": None if raw_hhh is None else _interval(raw_hhh), "hhh_corrected": hhh_of(corrected),
            "hhh_corrected_ci": None if corrected_hhh is None else _interval(corrected_hhh)}


def _interval(replicates) -> list[float] | None:
    interval = percentile_interval(replicates)
    return None if interval is None else list(interval)


def paper_protocol_sizes(config: RunConfig) -> dict[str, int]:
    """{axis: the paper's number of evaluated prompts (its data module's ``PAPER_N``: the first 50 AlpacaEval
    instructions, 500 BeaverTails prompts, all TruthfulQA questions)} for each axis this run evaluates more
    of (else empty); the judges never fit on those prompts either (``judges.fit.exclusion_config``)."""
    sizes = {}
    if config.evaluate.split == "dev":  # dev prompts are not the paper's test prefixes
        return sizes
    for axis in config.experts:
        ours, paper = getattr(config.evaluate, f"{axis}_n", None), axis_spec(axis).paper_n
        if paper is not None and (ours is None or ours > paper):
            sizes[axis] = paper
    return sizes


def _answered_by(system: str, axis: str) -> str:
    """Whose answers a system gives on an axis: oracle-routed answers each axis's prompts with that axis's expert."""
    from h3fusion.baselines.oracle import ORACLE, oracle_expert

    return oracle_expert(axis) if system == ORACLE else system


def _headline(figures: dict) -> dict:
    """A judge's name and headline figures: equal for the same fit, different after a refit (its error
    summary is derived from its validation record, so it is left out with it)."""
    return {k: v for k, v in figures.items() if k not in ("validation", "error")}


def _comparable_entries(path: Path, config: RunConfig, judge_figures: dict, log) -> dict:
    """Systems of an earlier results.json that a partial re-evaluation may keep (see ``evaluate_run``)."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
        changed = runs.changed_evaluate_settings(earlier, config)
        other_judges = [axis for axis, figures in judge_figures.items()
                        if _headline((earlier.get("judges") or {}).get(axis) or {}) != _headline(figures)]
        entries = dict(earlier["systems"])
    except (OSError, ValueError, KeyError, TypeError):
        log(f"[evaluate] {path} is unreadable: writing only the systems scored now")
        return {}
    why = ("records no evaluate settings" if changed is None
           else f"was scored with other evaluate settings ({', '.join(changed)})" if changed
           else f"was scored by other judges ({', '.join(other_judges)})" if other_judges else "")
    if why:
        log(f"[evaluate] {path} {why}: its other systems are dropped (run `h3fusion evaluate` without --system "
            "to rescore them)")
        return {}
    return entries


def judge_fingerprint(axis: str, judge) -> dict:
    """Who scored a judgements file: the judge's name and a hash of its validation record (a refit, another
    judge or another external model gives another hash)."""
    figures = _judge_figures(axis, judge)
    digest = hashlib.sha256(json.dumps(figures["validation"], sort_keys=True, default=str).encode()).hexdigest()
    return {"judge": figures["name"], "fingerprint": digest[:16]}


def _judged(config: RunConfig, system: str, axis: str, judge, prompts: Sequence[dict]) -> list[dict]:
    """A system's answers to the axis's evaluated ``prompts`` with the judge's score and label (cached in
    ``<run>/judgements``; the cache is used only when the same judge wrote it, see ``judge_fingerprint``)."""
    source = runs.generated_file(config, system, axis)
    records = read_jsonl(source) if source.is_file() else []
    expected = len(prompts)
    if len(records) < expected:
        raise H3FusionError(f"{source} holds {len(records)} of {expected} answers; finish it with "
                            "`h3fusion generate` first")
    records = records[:expected]
    check_answers(records, prompts, source)  # answers to another prompt set are never scored as these
    cache = runs.judgements_file(config, system, axis)
    stamp = runs.judge_stamp_file(config, system, axis)
    who = judge_fingerprint(axis, judge)
    if cache.is_file() and (not stamp.is_file() or json.loads(stamp.read_text()) != who):
        cache.unlink()  # scored by another judge (or by a version that did not record it): score again
    if not cache.is_file():
        write_json(stamp, who)
    judged = read_jsonl(cache, repair=True) if cache.is_file() else []
    step = getattr(judge, "records_per_call", None) or len(records)  # a remote judge: kept as it answers
    while len(judged) < len(records):  # score what is not cached yet, appending as it is scored
        new = judge_records(axis, judge, records[len(judged):len(judged) + step])
        append_jsonl(cache, new)
        judged += new
    return judged[: len(records)]


def _rerank_axis(config: RunConfig, axis: str, judge, experts: list[str], prompts: Sequence[dict]) -> list[dict]:
    """The rerank ensemble's judged answers; its answers are also written as its assembled answers file."""
    from h3fusion.baselines.ensembles import RERANK, rerank

    picked = rerank(axis, {e: _judged(config, e, axis, judge, prompts) for e in experts})
    # derived from the experts' files, so rewritten whole every time: its answers and their judgements
    write_jsonl(runs.assembled_file(config, RERANK, axis),
                [{k: v for k, v in r.items() if k not in ("score", "label")} for r in picked])
    write_jsonl(runs.judgements_file(config, RERANK, axis), picked)
    return picked


def _oracle_axis(config: RunConfig, axis: str, judge, prompts: Sequence[dict]) -> list[dict]:
    """oracle-routed's judged answers on an axis: that axis's expert's (also written as its assembled answers)."""
    from h3fusion.baselines.oracle import ORACLE, oracle_expert

    judged = _judged(config, oracle_expert(axis), axis, judge, prompts)
    # derived from the expert's files, so rewritten whole every time, like ensemble-rerank's
    write_jsonl(runs.assembled_file(config, ORACLE, axis),
                [{k: v for k, v in r.items() if k not in ("score", "label")} for r in judged])
    write_jsonl(runs.judgements_file(config, ORACLE, axis), judged)
    return judged


def _summary(axis: str, metrics: dict) -> str:
    spec = axis_spec(axis)
    return f"{spec.summary} {metrics[spec.headline]:.3f}"


def _judge_figures(axis: str, judge) -> dict:
    """The judge's name and its validation figures the axis's spec names (``AxisSpec.figures``)."""
    v = dict(getattr(judge, "validation", {}) or {})
    name = v.get("judge") or v.get("name") or getattr(judge, "name", type(judge).__name__)
    return {"name": name, **{f.key: _lookup(v, f.path) for f in axis_spec(axis).figures}, "validation": v}


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def prepare_user_records(axis: str, records: list[dict], config: RunConfig, origin: str) -> list[dict]:
    """Map a user's JSONL onto the fields a judge needs; what a record lacks of them (``AxisSpec.user_fields``)
    comes from the test record with the same prompt (case and spacing ignored)."""
    from h3fusion.data import load_answerable

    spec = axis_spec(axis)
    known = ({" ".join(prompt_text(r, axis=axis)[0].split()).lower(): r for r in load_answerable(axis, config)}
             if spec.user_fields else {})
    prepared = []
    for line, record in enumerate(records, 1):
        where = f"{origin} line {line}"
        if not isinstance(record.get("response"), str):
            raise H3FusionError(f"{where}: no 'response' field to judge")
        prompt, _ = prompt_text(record, where, axis)
        match = known.get(" ".join(prompt.split()).lower(), {})
        prepared.append(spec.prepare_user_record(record, prompt, match, where))
    return prepared
