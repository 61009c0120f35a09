"""The `h3fusion` command: one verb per pipeline stage, each a thin wrapper over a library function.

Errors a user can fix (``H3FusionError``) print one ``error:`` line and exit 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from h3fusion.errors import H3FusionError

app = typer.Typer(
    help="Fuse helpful, harmless and honest LoRA experts into one mixture-of-experts LLM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML run config, e.g. configs/demo.yaml")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set train.lr=1e-4 (repeatable)")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run directory (overrides run_dir in the config)")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", help="For a PEFT adapter dir: its base model (default: the one its adapter_config.json records)")]


_held = ExitStack()  # the run lock a verb took: released when main() ends, on errors too
_runs: list[Path] = []  # the run a verb writes into: named by a refused write that names no file


def _config(path: Path, overrides: list[str] | None, out: Path | None, lock: str | None = None):
    """The run config; ``lock``: this verb writes into the run, one process at a time (h3fusion.runlock)."""
    from h3fusion.config import load_config

    overrides = list(overrides or [])
    if out is not None:
        overrides.append(f"run_dir={out}")
    config = load_config(path, overrides)
    if lock:
        from h3fusion.runlock import run_lock

        _held.enter_context(run_lock(config.run_path, lock))
        _runs.append(config.run_path)
    return config


def _print_version(value: bool) -> None:
    if value:
        from h3fusion import __version__

        typer.echo(f"h3fusion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed h3fusion version and exit")] = False,
) -> None:
    if debug:
        os.environ["H3FUSION_DEBUG"] = "1"


@app.command()
def run(
    config: ConfigArg,
    stage: Annotated[list[str] | None, typer.Option(help="Only this stage (repeatable)")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """The whole pipeline (align, build, fuse, baselines, generate, evaluate, report), each stage skipped when complete."""
    cfg = _config(config, set_, out, lock="run")
    from h3fusion.pipeline import run as run_pipeline

    run_pipeline(cfg, stage)
    typer.echo(f"run: {cfg.run_path}")


@app.command()
def align(
    config: ConfigArg,
    axis: Annotated[list[str] | None, typer.Option(help="Only this axis (repeatable)")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Stage 1: train one LoRA expert per axis on the FFN projections."""
    cfg = _config(config, set_, out, lock="align")
    from h3fusion.experts import align as run_align

    paths = run_align(cfg, axis)
    for name, path in paths.items():
        typer.echo(f"expert {name}: {path}")


@app.command()
def build(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Stage 2: build the MoE from the base model and the expert adapters into <run>/moe/."""
    cfg = _config(config, set_, out, lock="build")
    from h3fusion.build import build_run

    typer.echo(f"moe: {build_run(cfg)}")


@app.command()
def fuse(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Stage 3: fusion training (gating loss + drift regularisation) into <run>/fused/."""
    cfg = _config(config, set_, out, lock="fuse")
    from h3fusion.fusion import fuse_run

    typer.echo(f"fused: {fuse_run(cfg)}")


@app.command()
def generate(
    target: Annotated[str, typer.Argument(
        help="A run config (.yaml), or with --prompts a model spec, fused model dir or PEFT adapter dir")],
    prompts: Annotated[Path | None, typer.Option(help="JSONL of prompts (field prompt, instruction or question)")] = None,
    output: Annotated[Path | None, typer.Option(help="Output JSONL (input fields + response)")] = None,
    system: Annotated[list[str] | None, typer.Option(help="Run mode: only this system (repeatable)")] = None,
    axis: Annotated[list[str] | None, typer.Option(help="Run mode: only this axis (repeatable)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Prompt-file mode: new-token limit")] = 128,
    batch_size: Annotated[int, typer.Option(help="Prompt-file mode: batch size")] = 8,
    prompt_format: Annotated[str, typer.Option(help="Prompt-file mode: alpaca or chat")] = "alpaca",
    sample: Annotated[bool, typer.Option(help="Prompt-file mode: sample instead of greedy")] = False,
    temperature: Annotated[float, typer.Option(help="Prompt-file mode: sampling temperature")] = 0.6,
    seed: Annotated[int, typer.Option(help="Prompt-file mode: sampling seed")] = 0,
    expert_bias: Annotated[list[str] | None, typer.Option(
        help="Prompt-file mode, fused models: router-logit bias, e.g. --expert-bias harmless=2 (repeatable)")] = None,
    base: BaseOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Answer prompts: every evaluated test prompt of a run's systems, or a JSONL of your own."""
    if target.endswith((".yaml", ".yml")):
        cfg = _config(Path(target), set_, out, lock="generate")
        from h3fusion.generate import generate_run

        typer.echo(f"generations: {generate_run(cfg, system, axis)}")
        return
    if prompts is None or output is None:
        raise H3FusionError("generate MODEL needs --prompts FILE and --output FILE (or pass a run config .yaml)")
    if prompt_format not in ("alpaca", "chat"):
        raise H3FusionError(f"--prompt-format {prompt_format!r}: choose alpaca or chat")
    from h3fusion.config import parse_expert_bias
    from h3fusion.generate import generate_prompt_file

    try:
        bias = parse_expert_bias(expert_bias or [])
    except ValueError as error:
        raise H3FusionError(f"--expert-bias {expert_bias}: {error}; use name=number, e.g. harmless=2") from None
    stats = generate_prompt_file(target, prompts, output, base=base, expert_bias=bias, prompt_format=prompt_format,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample,
                                 temperature=temperature, seed=seed)
    typer.echo(f"{stats['prompts']} answers ({stats['tokens_per_second']} tokens/s) -> {output}")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="A model spec, fused model dir (shows its routing) or PEFT adapter dir")],
    base: BaseOpt = None,
    prompt_format: Annotated[str, typer.Option(help="alpaca or chat (the tokenizer's chat template)")] = "alpaca",
    max_new_tokens: Annotated[int, typer.Option(help="New-token limit per answer")] = 256,
) -> None:
    """Talk to a model in the terminal; with a fused model, see and steer its routing (/bias, /topk, /reset)."""
    if prompt_format not in ("alpaca", "chat"):
        raise H3FusionError(f"--prompt-format {prompt_format!r}: choose alpaca or chat")
    from rich.console import Console

    from h3fusion.chat import ChatSession, run_chat
    from h3fusion.models import load_model

    loaded, tokenizer = load_model(model, base=base)
    run_chat(ChatSession(loaded, tokenizer, prompt_format, max_new_tokens), Console(soft_wrap=True),
             echo=not sys.stdin.isatty())


@app.command()
def evaluate(
    config: ConfigArg,
    system: Annotated[list[str] | None, typer.Option(help="Only this system (repeatable)")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Score every system's generations with the judges -> <run>/results.json."""
    cfg = _config(config, set_, out, lock="evaluate")
    from h3fusion.evaluate import evaluate_run

    typer.echo(f"results: {evaluate_run(cfg, system)}")


@app.command("export-outputs")
def export_outputs(
    config: ConfigArg,
    system: Annotated[list[str] | None, typer.Option(help="Only this system (repeatable)")] = None,
    set_: SetOpt = None,
    out: OutOpt = None,
) -> None:
    """Write each system's AlpacaEval answers as <run>/alpaca_eval/<system>/model_outputs.json for the real alpaca_eval."""
    cfg = _config(config, set_, out)
    from h3fusion.alpaca_export import export_outputs as run_export

    written = run_export(cfg, system, log=lambda *_: None)
    for name, path in written.items():
        typer.echo(f"{name}: {path}")
    typer.echo("score one with GPT-4 (AlpacaEval 1, the paper's protocol): "
               "IS_ALPACA_EVAL_2=False alpaca_eval --model_outputs PATH")


@app.command()
def report(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Write <run>/report.md, <run>/plots/ and the fused model's card from results.json."""
    cfg = _config(config, set_, out, lock="report")
    from h3fusion.report import write_report

    typer.echo(f"report: {write_report(cfg)}")


@app.command()
def ablate(
    config: ConfigArg,
    name: Annotated[str, typer.Option(help="Name of this ablation (its directory and JSON file)")],
    set_: SetOpt = None,
    out: OutOpt = None,
    results_dir: Annotated[Path, typer.Option(help="Where the summary JSON goes")] = Path("results/ablations"),
) -> None:
    """One fusion setting on a finished run's experts -> results/ablations/<name>.json."""
    overrides = list(set_ or [])
    # the base run is the config as given, in its own directory; every other override is the ablation's
    base = _config(config, [o for o in overrides if o.startswith("run_dir=")], out)
    from h3fusion.ablate import ablate as run_ablation

    typer.echo(f"ablation: {run_ablation(base, name, overrides, results_dir, source=config)}")


judges_app = typer.Typer(help="The offline judges: fit and validate them.", no_args_is_help=True)
app.add_typer(judges_app, name="judges")


@judges_app.command("fit")
def judges_fit(
    config: Annotated[Path | None, typer.Argument(help="Run config (its data dir and evaluated subsets)")] = None,
    force: Annotated[bool, typer.Option(help="Refit even when cached")] = False,
    axis: Annotated[list[str] | None, typer.Option(help="Only this axis's judge (repeatable)")] = None,
    set_: SetOpt = None,
) -> None:
    """Fit (or reuse) the offline judges and print their held-out validation figures."""
    cfg = _default_config(config, set_)
    from h3fusion.config import AXES
    from h3fusion.judges.fit import fit_judges, summary

    for name, figures in fit_judges(cfg, cfg.judges.cache_dir, axes=axis or AXES, force=force,
                                    max_rows=cfg.judges.fit_max_rows).items():
        typer.echo(summary(name, figures))


@app.command()
def judge(
    axis: Annotated[str, typer.Argument(help="helpful, harmless or honest")],
    input: Annotated[Path, typer.Option("--input", help="JSONL records (instruction/prompt/question + response)")],
    output: Annotated[Path, typer.Option("--output", help="Output JSONL: input fields + score + label")],
    config: Annotated[Path | None, typer.Option(help="Run config selecting the judges (default: offline)")] = None,
    set_: SetOpt = None,
) -> None:
    """Score your own answers with one axis's judge."""
    cfg = _default_config(config, set_)
    from h3fusion.evaluate import judge_records, load_axis_judges, prepare_user_records
    from h3fusion.io import append_jsonl, read_jsonl

    records = prepare_user_records(axis, read_jsonl(input), cfg, str(input))
    judged = judge_records(axis, load_axis_judges(cfg, [axis], cross_fit=False)[axis], records)
    output.unlink(missing_ok=True)
    append_jsonl(output, judged)
    typer.echo(f"{len(judged)} records scored -> {output}")


def _default_config(path: Path | None, overrides: list[str] | None):
    from h3fusion.config import build_config

    return _config(path, overrides, None) if path else build_config({}, "defaults", list(overrides or []))


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="A fused model directory (e.g. runs/demo/fused)")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the exported checkpoint")],
    format: Annotated[str, typer.Option("--format", help="Export format: mixtral")] = "mixtral",
) -> None:
    """Write a fused model in another format (mixtral: standard Mixtral for vLLM / llama.cpp)."""
    if format != "mixtral":
        raise H3FusionError(f"unknown export format '{format}'; supported: mixtral")
    from h3fusion.models import load_model
    from h3fusion.moe.export import check_exportable, export_mixtral
    from h3fusion.moe.modeling import H3FusionForCausalLM

    check_exportable(model)  # what the saved config alone rules out is refused before any weights load
    loaded, tokenizer = load_model(str(model))
    if not isinstance(loaded, H3FusionForCausalLM):
        raise H3FusionError(f"{model} is not an h3fusion model (it loads as {type(loaded).__name__})")
    export_mixtral(loaded, out)
    tokenizer.save_pretrained(out)
    typer.echo(f"mixtral: {out}")


@app.command()
def routing(
    config: ConfigArg,
    model: Annotated[Path | None, typer.Option(help="MoE model dir (default: <run>/fused)")] = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output dir (default: <model>/routing)")] = None,
    source: Annotated[str, typer.Option(help="pool: held-out training-distribution prompts; test: test prompts")] = "pool",
) -> None:
    """Routing diagnostics on held-out prompts of each axis: heat-map, intensity histograms, accuracy."""
    cfg = _config(config, set_, None)
    from h3fusion.routing_check import check_routing

    out, stats = check_routing(cfg, model, out, source)
    for axis, s in stats["axes"].items():
        typer.echo(f"{axis}: router accuracy {s['accuracy']:.2f}, mean probs "
                   + ", ".join(f"{n} {p:.2f}" for n, p in zip(stats["experts"], s["mean_probs"], strict=True)))
    typer.echo(f"routing: {out}")


@app.command("model-info")
def model_info(
    model: Annotated[str, typer.Argument(help="Hub id, local dir, .gguf file, smollm2-135m or PEFT adapter dir")],
    base: BaseOpt = None,
) -> None:
    """Load a model (converting GGUF once; merging an adapter into its base) and print what h3fusion sees."""
    from h3fusion.models import (
        adapter_base,
        base_fingerprint,
        decoder_layers,
        is_adapter_dir,
        load_model,
        resolve_model_path,
    )

    loaded, tokenizer = load_model(model, base=base)
    cfg = loaded.config
    if is_adapter_dir(model):
        typer.echo(f"adapter: {model} (merged into its base {base or adapter_base(model)})")
    else:
        typer.echo(f"path: {resolve_model_path(model)}")
    typer.echo(f"class: {type(loaded).__name__} ({cfg.model_type})")
    typer.echo(f"layers: {len(decoder_layers(loaded))}, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}")
    typer.echo(f"parameters: {sum(p.numel() for p in loaded.parameters()):,}")
    typer.echo(f"chat template: {'yes' if tokenizer.chat_template else 'no'}; fingerprint {base_fingerprint(loaded)}")


@app.command()
def status(config: ConfigArg, set_: SetOpt = None, out: OutOpt = None) -> None:
    """Where a run stands: each stage done, part-way (from which step, how many answers) or to do; reads its files
    only, so it is safe while the run is writing."""
    from h3fusion.status import MISSING, evaluated_counts, generation_left, next_row, run_status

    cfg = _config(config, set_, out)
    counts = evaluated_counts(cfg)
    rows = run_status(cfg, counts)
    width = max(len(f"{r.stage} {r.item}") for r in rows)
    typer.echo(f"run: {cfg.run_path}" + (" (dev split)" if cfg.evaluate.split == "dev" else ""))
    for r in rows:
        typer.echo(f"  {f'{r.stage} {r.item}':<{width}}  {r.state:<8}  {r.detail}".rstrip())
    left = generation_left(cfg, counts)
    if left is not None:
        minutes = round(left[0] / 60)
        took = f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min" if minutes else \
            "under a minute"
        typer.echo(f"generation left: about {took} at this run's pace so far "
                   f"(the pace of {left[1]} timed parts, answers and MC1/MC2 scoring, scaled by each system's own speed "
                   "where known)")
    pick_up = next_row(rows)
    if pick_up is None:
        typer.echo("complete")
    elif pick_up.state == MISSING:  # no stage makes a given input: rerunning would stop at the stage that reads it
        typer.echo(f"next: point moe.adapters.{pick_up.item} at a PEFT LoRA adapter directory; a run stops at build "
                   "until then")
    else:
        typer.echo(f"next: {pick_up.stage} {pick_up.item} ({pick_up.state}); "
                   "the same `h3fusion run` (or that stage's verb) continues from there")


@app.command("data")
def data_stats(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the train/test record counts of every axis under this config."""
    from h3fusion.data import load_expert_train, load_test

    cfg = _config(config, set_, None)
    for axis in cfg.experts:
        typer.echo(f"{axis}: train {len(load_expert_train(axis, cfg))}, test {len(load_test(axis, cfg))}")


def _click_exceptions():
    """(ClickException, NoArgsIsHelpError, Abort) of the click typer runs on (newer typer vendors its own)."""
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
        from typer.exceptions import Abort
    except ImportError:
        from click.exceptions import Abort, ClickException, NoArgsIsHelpError
    return ClickException, NoArgsIsHelpError, Abort


def _command_path(ctx) -> str:
    """``h3fusion <verb>`` of a usage error: from its click context, else from the command line."""
    if ctx is not None:
        return ctx.command_path
    group, words = typer.main.get_command(app), ["h3fusion"]
    for arg in sys.argv[1:]:
        command = getattr(group, "commands", {}).get(arg)
        if command is None and not arg.startswith("-"):
            break
        if command is not None:
            words.append(arg)
            group = command
    return " ".join(words)


def main() -> None:
    """Console-script entry point: user errors and usage errors become one line, not a traceback.

    Usage errors (an unknown or misspelt flag or verb, a missing argument) print
    ``error: <click's message>; see h3fusion <verb> --help`` and exit 2, like ``H3FusionError``.
    """
    click_exception, no_args_is_help, abort = _click_exceptions()
    try:
        code = app(prog_name="h3fusion", standalone_mode=False)
    except H3FusionError as error:
        if os.environ.get("H3FUSION_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except no_args_is_help:
        sys.exit(2)  # `h3fusion` or `h3fusion judges` alone: the help is already printed
    except click_exception as error:
        if os.environ.get("H3FUSION_DEBUG") == "1":
            raise
        message = " ".join(line.strip() for line in error.format_message().splitlines() if line.strip())
        print(f"error: {message.rstrip('.')}; see {_command_path(getattr(error, 'ctx', None))} --help",
              file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, abort):
        code = 130
    except Exception as error:  # a refused write no stage named (export, judge --output ...): one line too
        from h3fusion.io import write_failure

        message = write_failure(error, _runs[-1] if _runs else None)
        if message is None or os.environ.get("H3FUSION_DEBUG") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        _held.close()
    if code == 130:  # typer returns 130 for Ctrl-C when not standalone
        print("interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
