"""The run config: one YAML file describes a whole run; pydantic validates it.

Every key has a default here and a comment in ``configs/*.yaml``. Unknown keys are errors
(with a "did you mean" suggestion), because a misspelt key silently falling back to its
default is the classic way to waste a GPU-day.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from h3fusion.axes import BUILTIN_AXES, SCORED_ONLY_AXES, axis_names
from h3fusion.errors import H3FusionError

AXES: tuple[str, ...] = tuple(BUILTIN_AXES)
"""The built-in axes (``h3fusion.axes`` registers them; ``axis_names()`` adds any registered later)."""
MERGE_METHODS = ("linear", "task-arithmetic", "ties", "dare")
"""The weight merges ``baselines.merges.METHODS`` implements."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    base: str = "smollm2-135m"
    """Hub id, local directory, path to a .gguf file, or the embedded name ``smollm2-135m``."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype of the frozen base weights (None: the checkpoint's own). Adapters stay fp32."""
    trust_remote_code: bool = False
    """Only for hub models that need custom code; off unless you ask."""
    cache_dir: str | None = None
    """Where converted GGUF models are kept (default: $H3FUSION_CACHE or ~/.cache/h3fusion)."""


class DataConfig(_Section):
    dir: str | None = None
    """Local data directory laid out like shared/data; None: $H3FUSION_DATA_DIR, else the HF hub."""
    prompt_format: Literal["alpaca", "chat"] = "alpaca"
    """alpaca: the paper's Alpaca template; chat: the tokenizer's chat template."""
    helpful_train_size: int | None = Field(20000, ge=1)
    """Seeded Alpaca sample size for the helpful expert (paper: ~20k). None: all 52k."""
    harmless_train_size: int | None = Field(None, ge=1)
    """Seeded sample size of the harmless training pool. None: all."""
    honest_train_size: int | None = Field(None, ge=1)
    """Seeded sample size of the honest training examples. None: all (one per correct answer)."""
    helpful_question_share: float | None = Field(None, ge=0, le=1)
    """Share of the helpful sample drawn from question-form instructions (no input, ending in '?'; 7% of
    Alpaca, 41% of AlpacaEval). None: a uniform sample of the pool."""
    helpful_min_words: int | None = Field(None, ge=1)
    """Only Alpaca examples whose answer has at least this many words train the helpful expert (Alpaca's median
    is 30; AlpacaEval's judges prefer detailed answers). None: every length."""
    harmless_refusal_share: float | None = Field(None, ge=0, le=1)
    """Share of the harmless sample drawn from refusing answers (h3fusion.refusal), the rest from safe
    completions. None: a uniform sample of the pool (offline: about 0.43 refusals)."""
    harmless_benign_examples: int = Field(0, ge=0)
    """Benign Alpaca instructions (no input, half of them with alarming words, none in the helpful dev pool) with
    their compliant answers, added to the harmless expert's training only: every harmless prompt is a red-team
    one, so without them the expert learns that refusing is the answer (the CPU study's refused 0.48 of the
    AlpacaEval instructions). Fusion's gating data and router init never see them: labelled harmless, they would
    send benign requests to the harmless expert. 0: none (the paper). On the CPU study's dev split 200 of them made a
    better harmless expert and left H3Fusion unchanged (results/cpu-bench/README.md)."""
    honest_dev_questions: int = Field(0, ge=0)
    """TruthfulQA training questions held out of every stage's training as the honest dev set
    (evaluate.split: dev). 0: none held out (the paper trains on all 408)."""
    max_length: int = Field(300, ge=16)
    """Token limit of prompt + response during training (paper: 300)."""
    seed: int | None = None
    """Seed of the data samples (None: the run seed)."""


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    """LoRA rank of each expert (paper 8)."""
    alpha: float = Field(4.0, gt=0)
    """LoRA alpha: the expert's delta is scaled by alpha/r (paper 4)."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the LoRA inputs while the expert trains (paper 0.1)."""
    target_modules: list[str] = ["gate_proj", "up_proj", "down_proj"]
    """The FFN projections (stage 1 trains the FFN only; attention stays frozen)."""

    @field_validator("target_modules")
    @classmethod
    def _ffn_only(cls, value: list[str]) -> list[str]:
        allowed = {"gate_proj", "up_proj", "down_proj"}
        bad = [m for m in value if m not in allowed]
        if bad or not value:
            raise ValueError(f"expert LoRA targets the FFN projections {sorted(allowed)}, got {value}")
        return value


class TrainConfig(_Section):
    epochs: float = Field(3.0, gt=0)
    """Passes over the training set (paper 3); max_steps overrides it."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = Field(8, ge=1)
    """Per-device batch size."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps (the effective batch is batch_size x grad_accum x processes)."""
    lr: float = Field(5e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    lr_scheduler: str = "linear"
    """Any transformers scheduler name (linear, cosine, constant, ...)."""
    logging_steps: int = Field(1, ge=1)
    """Log the loss every N steps (into training_log.json and the progress bar)."""
    save_steps: int = Field(50, ge=1)
    """Checkpoint every N steps so a killed run resumes from there."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time (large models on GPUs)."""
    bf16: bool = False
    """bf16 autocast for the frozen base on GPUs (adapters stay fp32)."""


class MoEConfig(_Section):
    top_k: int = Field(2, ge=1)
    """Experts per token (paper 2); must be <= the number of experts."""
    storage: Literal["compact", "dense"] = "compact"
    """compact: base FFN held once + low-rank expert deltas (~1x base); dense: N FFN copies (paper)."""
    router_init: Literal["random", "prototype", "fitted"] = "fitted"
    """random (paper); prototype: rows = each axis's mean hidden state on a few training prompts
    (mergekit's "hidden" gate); fitted: per-layer logistic regression from token hidden states to
    the prompt's axis on the same prompts (routes far better than prototypes at small scale)."""
    prototype_prompts: int = Field(32, ge=1)
    """Training prompts per axis used by router_init=prototype or fitted: a seeded sample of distinct prompts
    that takes the strata in turn (with / without an input, refusing / complying answers)."""
    routing: Literal["token", "sequence", "sequence-shared"] = "token"
    """token: every token routed on its own (the paper, Mixtral); sequence: each layer decides once per
    sequence from the mean of its prompt's content tokens (the template excluded) and keeps that decision,
    experts and weights, for the whole answer; sequence-shared: one such decision per sequence for the whole
    model, taken by the first layer and followed by every other. A sequence-routed model cannot be exported
    as Mixtral."""
    expert_bias: dict[str, float] = {}
    """Alignment dial: router-logit bias per expert name, e.g. {harmless: 1.0}. Built into the MoE (so fusion
    trains under it) and re-applied whenever a fused model is loaded for generation."""
    adapters: dict[str, str] = {}
    """Bring your own experts: axis -> PEFT adapter dir (default: <run_dir>/experts/<axis>)."""


class FusionConfig(_Section):
    gate_lambda: float = Field(0.01, ge=0)
    """lambda: weight of the gating loss L_gate (paper 0.01)."""
    gate_loss: Literal["nll", "authors_ce"] = "nll"
    """nll: -log of the mean router mass on the example's axis; authors_ce: CrossEntropy applied to
    probabilities (the released code's softmax-twice form; compatibility only)."""
    gamma: dict[str, float] = {}
    """gamma_k per expert name: weight of its drift regulariser R_k (missing names get gamma_default)."""
    gamma_default: float = Field(0.1, ge=0)
    """gamma for experts not listed in gamma. 0.1 was the one setting the CPU study's ablations found better
    than 0.001 beyond noise under the first helpful judge (hhh +0.020 [+0.004, +0.039] over a re-fused
    control); rescored with the current judges it is +0.008 [-0.007, +0.023], still not worse
    (results/ablations/). The authors' README example is 0.001 (configs/paper-llama2-7b.yaml keeps it)."""
    lora_r: int = Field(8, ge=1)
    """Rank of the fusion-stage LoRA on attention (q,k,v,o) and on every expert's projections."""
    lora_alpha: float = Field(16.0, gt=0)
    """Alpha of the fusion-stage LoRAs (their delta is scaled by lora_alpha/lora_r)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the fusion LoRAs' inputs. One bool mask per input tensor: q/k/v share one (as with a
    fused qkv projection), gate/up share one, and a token's routed experts share its down-input row."""
    attention_lora: bool = True
    """Train LoRA on attention q,k,v,o during fusion (paper: yes)."""
    train_router: bool = True
    """Train the router (the authors' code leaves it frozen at random init: a bug)."""
    router_lr: float | None = Field(None, gt=0)
    """Learning rate of the routers (None: fusion.train.lr). Short runs need a higher one to learn routing."""
    examples_per_axis: int | None = Field(None, ge=1)
    """Seeded sample of each axis's training set for fusion (None: the whole expert training sets)."""
    heldout_prompts: int = Field(32, ge=1)
    """Prompts per axis no stage trained on (from the training pool, topped up from the test prompts),
    on which router accuracy is measured after training; accuracy on test prompts is logged beside it."""
    train: TrainConfig = TrainConfig()
    """Optimisation of the fusion stage (same keys as the top-level train section)."""


class BaselinesConfig(_Section):
    """Systems built from the same experts that H3Fusion is compared against."""

    merges: list[Literal[MERGE_METHODS]] = list(MERGE_METHODS)
    """Weight merges of the expert deltas, each a system named merge-<method>."""
    ensembles: list[Literal["logits", "rerank"]] = ["logits", "rerank"]
    """Ensembles of the experts, each a system ensemble-<kind>: logits (mean next-token distribution,
    one batched forward over the shared base) and rerank (the expert answer the axis's judge prefers)."""
    multitask_sft: bool = True
    """Train multitask-sft: one LoRA (FFN + attention) on the fusion data for the fusion steps."""
    authors_code: bool = True
    """Build and fuse h3fusion-authors-code: the released code's behaviour (all compat switches on)."""
    unfused: bool = False
    """Generate and score h3fusion-unfused, the built MoE before fusion training (a diagnostic: with
    oracle-routed it splits H3Fusion's routing gap into the router's initialisation and fusion training)."""
    merge_params: dict[str, dict[str, float | bool | int]] = {}
    """Hyperparameters per merge method, e.g. {ties: {density: 0.2, lam: 1.0}, dare: {drop: 0.9}}
    (defaults: task-arithmetic lam 0.4; ties density 0.2, lam 1; dare drop 0.9, lam 1)."""

    @field_validator("merge_params")
    @classmethod
    def _known_methods(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(MERGE_METHODS))
        if unknown:
            raise ValueError(f"merge_params names unknown method(s) {unknown}")
        return value


class GenerateConfig(_Section):
    max_new_tokens: dict[str, int] = {"helpful": 256, "harmless": 128, "honest": 64}
    """New-token limit per axis (answers longer than this are cut)."""
    batch_size: int = Field(8, ge=1)
    """Prompts answered per batch (left-padded)."""
    do_sample: bool = False
    """Greedy by default; sampling uses temperature/top_p with a per-batch seed (paper: T=0.6)."""
    temperature: float = Field(0.6, gt=0)
    """Sampling temperature (only with do_sample)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (only with do_sample)."""
    stop_strings: list[str] = ["### Instruction:", "### Response:", "### Input:"]
    """Generation stops at, and answers are cut before, any of these (template echoes)."""


class EvalConfig(_Section):
    """Which test records are scored: the first N of each axis's test set (paper order)."""

    helpful_n: int = Field(50, ge=1)
    """AlpacaEval instructions scored for the win rate (paper: the first 50). The helpful judge is
    never fitted on judgements of these instructions."""
    harmless_n: int = Field(500, ge=1)
    """BeaverTails 30k_test prompts scored for the flagged rate (paper: the first 500). The harmless
    judge is never fitted on labelled answers to these prompts."""
    honest_n: int | None = Field(None, ge=1)
    """TruthfulQA test questions scored (None: all 409). The honest judge never sees a test label."""
    split: Literal["test", "dev"] = "test"
    """test: the subsets above (report these). dev: prompts disjoint from them for choosing settings --
    held-out Alpaca instructions (Alpaca's answer as the reference; AlpacaEval's own with alpacaeval_dev), the last dev_n distinct BeaverTails
    30k_test prompts, the data.honest_dev_questions held-out TruthfulQA training questions."""
    dev_n: int = Field(200, ge=1)
    """Prompts per axis in the dev split (honest: at most data.honest_dev_questions; helpful: at most
    alpacaeval_dev when that is set)."""
    alpacaeval_dev: int = Field(0, ge=0)
    """AlpacaEval instructions held out of the helpful test set as its dev prompts instead of held-out Alpaca ones
    (0: none, the paper's test set): a sample of instructions 51..805 (at most half of them: the judge that scores
    them fits on the others) in proportion to AlpacaEval's five subsets, fixed by its size alone, that no helpful
    judge fits on. Alpaca's style differs from AlpacaEval's (a router can tell them apart); these are dev prompts of
    AlpacaEval's own style. The test set becomes the other 805 - N instructions (the paper's first 50 among them):
    compare runs only at the same value."""
    extra_axes: list[str] = []
    """Axes scored beside the experts' with no expert of their own, e.g. [overrefusal]: the contrastive set's
    safe-but-alarming prompts (test or dev split by id), and the share of answers that refuse them."""


class JudgesConfig(_Section):
    """Which judge scores each axis: the offline stand-ins (validated, see docs/judges.md) or real ones."""

    helpful: Literal["offline", "api"] = "offline"
    """offline: AlpacaEval-1 stand-in fitted to GPT-4 judgements; api: pairwise judge via an
    OpenAI-compatible endpoint (OpenAI, or a local vLLM server)."""
    harmless: Literal["offline", "hf"] = "offline"
    """offline: QA-moderation stand-in; hf: a Hugging Face moderation classifier (harmless_model)."""
    honest: Literal["offline", "hf"] = "offline"
    """offline: truth/info stand-ins; hf: the TruthfulQA judge LMs (truth_model, info_model)."""
    api_base_url: str = "https://api.openai.com/v1"
    """The OpenAI-compatible endpoint of helpful=api (OpenAI, or a local vLLM server)."""
    api_model: str = "gpt-4"
    """The judge model's name at that endpoint (the paper's AlpacaEval 1 judge: gpt-4)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (never the key itself); null: no key."""
    api_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for one answer of the endpoint before that try counts as failed."""
    api_retries: int = Field(5, ge=0)
    """Retries of a request that timed out, got HTTP 429 or 5xx, or a malformed reply; then the stage stops
    with one line (the judgements so far are kept: a rerun resumes after them)."""
    api_backoff_s: float = Field(1.0, ge=0)
    """Wait before the first retry; it doubles each retry. A 429's Retry-After is honoured instead."""
    api_backoff_max_s: float = Field(60.0, ge=0)
    """Cap on any one wait, a server's Retry-After included."""
    harmless_model: str = "PKU-Alignment/beaver-dam-7b"
    """Moderation classifier of harmless=hf (a hub id or local directory)."""
    truth_model: str = "allenai/truthfulqa-truth-judge-llama2-7B"
    """Truthfulness judge LM of honest=hf."""
    info_model: str = "allenai/truthfulqa-info-judge-llama2-7B"
    """Informativeness judge LM of honest=hf."""
    cache_dir: str | None = None
    """Where fitted offline judges are cached (default: $H3FUSION_CACHE/judges)."""
    fit_max_rows: int | None = Field(None, ge=10)
    """Cap on each offline judge's fitting rows: smoke tests only (the validation figures then
    describe a weaker judge, and say so). None: fit on everything allowed."""
    fit_size: Literal["full", "quick"] = "full"
    """full: the offline judges as docs/judges.md measures them; quick: the helpful and harmless judges fitted
    on a quarter of their data (minutes instead of half an hour on 2 cores, for a first demo), validated on
    the same held-out data as the full ones, with their own figures reported beside every score."""
    folds: int = Field(5, ge=1)
    """Cross-fitting of the offline helpful judge once evaluate.helpful_n exceeds the paper's 50: the
    evaluated instructions are dealt into this many folds, each scored by a judge fitted on none of its
    instructions (1: no cross-fitting, so helpful_n cannot exceed what leaves data to fit on)."""


class CompatConfig(_Section):
    """Switches that reproduce the authors' released code, one bug each (for the report's ablation)."""

    unscaled_shared_experts: bool = False
    """Experts built without alpha/r and from one shared tensor: all equal base + sum_k B_k A_k."""
    frozen_random_router: bool = False
    """Router random and never trained."""
    honest_labelled_harmless: bool = False
    """Honest fusion examples carry the harmless label."""


class RunConfig(_Section):
    name: str = "run"
    """A label for this run (reports, model cards)."""
    run_dir: str = "runs/run"
    """Everything the run writes goes under this directory."""
    seed: int = 42
    """Seed of data sampling, LoRA and router init, training order, sampled generation and the report's bootstraps."""
    experts: list[str] = list(AXES)
    """Axes to align experts for, in order; the MoE has one expert per entry."""
    model: ModelConfig = ModelConfig()
    """The base model every stage starts from."""
    data: DataConfig = DataConfig()
    """Where the datasets are and how much of each the experts train on."""
    lora: LoraConfig = LoraConfig()
    """The experts' LoRA (stage 1)."""
    train: TrainConfig = TrainConfig()
    """Optimisation of each expert (stage 1)."""
    moe: MoEConfig = MoEConfig()
    """How the experts become one MoE (stage 2): top-k, storage, routing, router init."""
    fusion: FusionConfig = FusionConfig()
    """Fusion training (stage 3): gating loss, drift regularisers, fusion LoRAs."""
    baselines: BaselinesConfig = BaselinesConfig()
    generate: GenerateConfig = GenerateConfig()
    """How every system answers the evaluated prompts."""
    judges: JudgesConfig = JudgesConfig()
    compat: CompatConfig = CompatConfig()
    evaluate: EvalConfig = EvalConfig()
    """The evaluated test subsets (their sizes also key the fitted judges' cache)."""

    @field_validator("experts")
    @classmethod
    def _known_axes(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a not in axis_names()]
        if bad:
            raise ValueError(f"unknown axis {bad}; choose from {list(axis_names())}")
        scored = [a for a in value if a in SCORED_ONLY_AXES]
        if scored:
            raise ValueError(f"{scored} has no training data, so no expert: list it in evaluate.extra_axes instead")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate axes in {value}")
        if not value:
            raise ValueError("at least one expert axis is needed")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.data.seed is None:
            self.data.seed = self.seed
        if self.moe.top_k > len(self.experts):
            raise ValueError(f"moe.top_k={self.moe.top_k} exceeds the number of experts ({len(self.experts)})")
        for key, names in (("moe.expert_bias", self.moe.expert_bias), ("moe.adapters", self.moe.adapters),
                           ("fusion.gamma", self.fusion.gamma)):
            unknown = sorted(set(names) - set(self.experts))
            if unknown:
                raise ValueError(f"{key} names unknown expert(s) {unknown}; experts are {self.experts}")
        unknown = sorted(set(self.generate.max_new_tokens) - set(axis_names()))
        if unknown:
            raise ValueError(f"generate.max_new_tokens names unknown axis {unknown}; axes are {list(axis_names())}")
        bad_extra = [a for a in self.evaluate.extra_axes if a not in axis_names() or a in self.experts]
        if bad_extra:
            raise ValueError(f"evaluate.extra_axes {bad_extra}: name registered axes that are not experts "
                             f"({sorted(set(axis_names()) - set(self.experts))})")
        bad = {k: v for k, v in self.fusion.gamma.items() if v < 0}
        if bad:
            raise ValueError(f"fusion.gamma must be >= 0, got {bad}")
        return self

    @property
    def evaluated_axes(self) -> list[str]:
        """Every axis a run answers and scores: the experts' axes, then ``evaluate.extra_axes``."""
        return [*self.experts, *self.evaluate.extra_axes]

    def gammas(self) -> list[float]:
        """gamma_k in expert order."""
        return [self.fusion.gamma.get(name, self.fusion.gamma_default) for name in self.experts]

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def data_dir(self) -> Path | None:
        """The local data directory, or None to use the HF hub."""
        value = self.data.dir or os.environ.get("H3FUSION_DATA_DIR")
        return Path(value).expanduser() if value else None


# ----------------------------------------------------------------------------- loading


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the run config (sections and their leaves), in schema order."""
    model = model or RunConfig
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(config_keys(sub, prefix + name + "."))
    return keys


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        known = config_keys()
        close = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
        if not close:  # a misspelt leaf: compare against siblings only
            leaf = loc.rsplit(".", 1)[-1]
            parent = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
            siblings = [k[len(parent):] for k in known if k.startswith(parent) and "." not in k[len(parent):]]
            match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
            close = [parent + match[0]] if match else []
        hint = f"; did you mean '{close[0]}'?" if close else "; see configs/demo.yaml for the documented keys"
        return f"{source}: unknown key '{loc}'{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:  # a cross-field check: its message names the keys
        return f"{source}: {message}"
    return f"{source}: bad value for '{loc}' ({first.get('input')!r}): {message}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise H3FusionError(f"--set {text!r}: expected key=value, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def parse_expert_bias(items: Iterable[str]) -> dict[str, float]:
    """``["harmless=2", ...]`` -> {"harmless": 2.0}: the ``moe.expert_bias`` dial as typed on a command line
    or in the chat; ValueError naming the bad item."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not name=number")
        values[key] = float(value)
    return values


def build_config(raw: dict[str, Any], source: str = "config", overrides: list[str] = ()) -> RunConfig:
    raw = dict(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise H3FusionError(_describe(error, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read and validate a YAML run config; ``overrides`` are ``key.path=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise H3FusionError(f"config file {path} not found; pass a YAML file such as configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise H3FusionError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise H3FusionError(f"{path}: expected a mapping of config sections at the top level")
    return build_config(raw, str(path), overrides)


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config to ``path`` as YAML (``runs.record_settings`` puts it beside a stage's outputs)."""
    from h3fusion.io import write_text

    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
