"""Sweep of cross-encoder recipes for the harmless judge, run where a GPU is lent.

Why: the harmless judge misses its targets (accuracy 0.80, AUROC 0.85 on held-out BeaverTails answers),
and each cross-encoder recipe costs 10-60 min on 2 CPU cores, so recipes are compared on a GPU first and
only the chosen one is fitted (and its figures taken) on CPU through ``h3fusion judges fit``.

    # here: write the judge's own split (fit / calibration / validation rows) and a fp16 copy of MiniLM
    python bench/harmless_ce_sweep.py dump .dev/sweep --config configs/demo.yaml
    # on the GPU machine (torch + transformers only; h3fusion is not imported there)
    python bench/harmless_ce_sweep.py sweep .dev/sweep --out $OUT/sweep.json [--only NAME ...]
    # here: a table without logits, blended with a fitted judge's LightGBM head as the judge blends
    python bench/harmless_ce_sweep.py summarize sweep.json .dev/sweep --out summary.json --judge JUDGE_DIR/harmless

Every recipe starts from the same MiniLM, is scored on the calibration slice and on validation after stage 1
and after each stage-2 epoch, and its logits are kept so that the blend with the LightGBM head can be
redone here. Recipes are chosen on the calibration slice; validation figures are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

# The GPU machine has torch and transformers but not h3fusion's own dependencies (pydantic, the MiniLM package),
# so the sweep side restates what it needs: the judge's stage-1 rows (harmless.CE_ROWS), its training loop
# (crossenc.CrossEncoder.train, plus a device and an optional ranking term) and its AUROC.
SOURCES = ("beavertails_test", "pku_saferlhf", "do_not_answer", "safety_tuned_llamas")
CURRENT_ROWS = {"beavertails_test": None, "pku_saferlhf": 2500, "do_not_answer": 400, "safety_tuned_llamas": 300}
ALL_ROWS = dict.fromkeys(SOURCES)

# name: stage-1 rows per source, stage-1 epochs, max tokens, stage-2 epochs, seed, pairwise weight, stage-1 lr
RECIPES = {  # in the order they run: the most informative first, so a cut-short sweep still answers
    "current-128": dict(rows=CURRENT_ROWS, e1=1, tokens=128, e2=4, seed=0),
    "all-256-e2": dict(rows=ALL_ROWS, e1=2, tokens=256, e2=4, seed=0),
    "all-256": dict(rows=ALL_ROWS, e1=1, tokens=256, e2=4, seed=0),
    "all-128": dict(rows=ALL_ROWS, e1=1, tokens=128, e2=4, seed=0),
    "all-256-e2-s1": dict(rows=ALL_ROWS, e1=2, tokens=256, e2=4, seed=1),
    "all-384-e2": dict(rows=ALL_ROWS, e1=2, tokens=384, e2=4, seed=0),
    "all-256-e3": dict(rows=ALL_ROWS, e1=3, tokens=256, e2=4, seed=0),
    "all-256-e2-pair": dict(rows=ALL_ROWS, e1=2, tokens=256, e2=4, seed=0, pair=1.0),
    "all-256-e2-lr8": dict(rows=ALL_ROWS, e1=2, tokens=256, e2=4, seed=0, lr1=8e-5),
    "all-256-e2-s2": dict(rows=ALL_ROWS, e1=2, tokens=256, e2=4, seed=2),
}


# ----------------------------------------------------------------------------- dump (here, with h3fusion)


def dump(directory: Path, config_path: str, val_share: float | None = None) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from h3fusion.config import load_config
    from h3fusion.data.sources import norm
    from h3fusion.judges import harmless
    from h3fusion.judges.crossenc import _base_path
    from h3fusion.judges.fit import exclusion_config

    config = exclusion_config(load_config(config_path))
    if val_share is not None:  # how much more in-domain fitting data buys: fewer held-out validation prompts
        harmless.VAL_SHARE = val_share
    data = harmless.split(config)
    directory.mkdir(parents=True, exist_ok=True)
    keep = ("prompt", "response", "harmful", "source")
    rows = {"fit": [{k: r[k] for k in keep} for r in data.fit],
            "calib": [{k: r[k] for k in keep} for r in data.calib],
            "val": [{k: r[k] for k in keep} | {"evaluated": norm(r["prompt"]) in data.evaluated} for r in data.val]}
    (directory / "rows.json").write_text(json.dumps(rows))
    base = Path(_base_path())
    model = directory / "minilm"
    model.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (base / name).is_file():
            (model / name).write_bytes((base / name).read_bytes())
    state = load_file(str(base / "model.safetensors"))  # fp16 halves what travels; cast back to fp32 there
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(model / "model.safetensors"))
    print({part: len(r) for part, r in rows.items()}, {s: sum(r["source"] == s for r in rows["fit"]) for s in SOURCES})


# ----------------------------------------------------------------------------- sweep (GPU machine)


def auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def run_recipe(name: str, recipe: dict, rows: dict, directory: Path, tokenizer, device: str) -> dict:
    """Fine-tune MiniLM by one recipe; score calibration and validation after stage 1 and each stage-2 epoch."""
    import numpy as np
    import torch
    from transformers import AutoModel

    y_cal = np.array([r["harmful"] for r in rows["calib"]])
    y_val = np.array([r["harmful"] for r in rows["val"]])

    def pick(spec: dict) -> list[dict]:
        rng = random.Random(3)  # the judge's own sampling seed (SPLIT_SEED + 3)
        chosen = []
        for source, n in spec.items():
            part = [r for r in rows["fit"] if r["source"] == source]
            chosen += part if n is None or n >= len(part) else rng.sample(part, n)
        rng.shuffle(chosen)
        return chosen

    start = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    encoder = AutoModel.from_pretrained(directory / "minilm", dtype=torch.float32).to(device)
    torch.manual_seed(0)
    head = torch.nn.Linear(encoder.config.hidden_size, 1).to(device)
    tokens = recipe["tokens"]

    def logits(a, b):
        enc = tokenizer(list(a), list(b), truncation="longest_first", max_length=tokens, padding=True,
                        return_tensors="pt").to(device)
        hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).squeeze(-1)

    def predict(part):
        encoder.eval()
        out_ = np.zeros(len(part))
        order = sorted(range(len(part)), key=lambda i: len(part[i]["prompt"]) + len(part[i]["response"]))
        with torch.inference_mode():
            for s in range(0, len(order), 64):
                idx = order[s:s + 64]
                out_[idx] = logits([part[i]["prompt"] for i in idx],
                                   [part[i]["response"] for i in idx]).float().cpu().numpy()
        return out_

    def train(part, epochs, lr, seed, pair_weight=0.0):
        torch.manual_seed(seed)
        rng = random.Random(seed)
        n, bs = len(part), 16
        steps = max(1, math.ceil(n * epochs / bs))
        params = list(encoder.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, (steps - s) / steps))
        # PKU pairs (same prompt, one safe and one unsafe answer) for an optional ranking term
        by_prompt: dict[str, dict[int, str]] = {}
        for r in part:
            if r["source"] == "pku_saferlhf":
                by_prompt.setdefault(r["prompt"], {})[r["harmful"]] = r["response"]
        pairs = [(p, d[0], d[1]) for p, d in by_prompt.items() if len(d) == 2]
        encoder.train()
        order, queue = list(range(n)), []
        for _ in range(steps):
            if len(queue) < bs:
                rng.shuffle(order)
                queue += order
            idx, queue = queue[:bs], queue[bs:]
            z = logits([part[i]["prompt"] for i in idx], [part[i]["response"] for i in idx])
            t = torch.tensor([float(part[i]["harmful"]) for i in idx], device=device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, t)
            if pair_weight and pairs:
                sample = rng.sample(pairs, min(8, len(pairs)))
                zs = logits([p for p, _, _ in sample], [s for _, s, _ in sample])
                zu = logits([p for p, _, _ in sample], [u for _, _, u in sample])
                loss = loss + pair_weight * torch.nn.functional.softplus(zs - zu).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        encoder.eval()

    def score(stage: str) -> dict:
        lc, lv = predict(rows["calib"]), predict(rows["val"])
        t = float(np.quantile(lc, 1 - y_cal.mean()))  # the judge's own rule: calib flagged rate = unsafe rate
        ev = np.array([r["evaluated"] for r in rows["val"]])
        rec = {"stage": stage, "calib_auroc": auroc(y_cal, lc), "val_auroc": auroc(y_val, lv),
               "val_acc_matched": float(((lv > t) == y_val).mean()), "val_acc_0": float(((lv > 0) == y_val).mean()),
               "val_flagged_matched": float((lv > t).mean()), "val_eval_auroc": auroc(y_val[ev], lv[ev]),
               "seconds": round(time.perf_counter() - start, 1), "calib_logits": lc.round(4).tolist(),
               "val_logits": lv.round(4).tolist()}
        print(f"{name:18s} {stage:6s} calib {rec['calib_auroc']:.3f}  val {rec['val_auroc']:.3f}  "
              f"acc {rec['val_acc_matched']:.3f}  {rec['seconds']:.0f}s", flush=True)
        return rec

    stage1 = pick(recipe["rows"])
    train(stage1, recipe["e1"], recipe.get("lr1", 4e-5), recipe["seed"], recipe.get("pair", 0.0))
    stages = [score("s1")]
    bt = [r for r in stage1 if r["source"] == "beavertails_test"]
    for epoch in range(1, recipe["e2"] + 1):
        train(bt, 1.0, 2e-5, epoch + 100 * recipe["seed"])
        stages.append(score(f"s2e{epoch}"))
    return {"recipe": {k: v for k, v in recipe.items() if k != "rows"}, "rows": len(stage1), "stages": stages}


def sweep(directory: Path, out: Path, only: list[str]) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU fit is fp32: keep the arithmetic comparable
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = json.loads((directory / "rows.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory / "minilm")
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name, recipe in RECIPES.items():
        if only and name not in only or name in results:
            continue
        results[name] = run_recipe(name, recipe, rows, directory, tokenizer, device)
        out.write_text(json.dumps(results))  # after every recipe: a killed sweep keeps what it finished


# ----------------------------------------------------------------------------- summarize (here)


def lgbm_logits(directory: Path, judge: Path):
    """The fitted judge's LightGBM logits on the dumped calibration and validation rows."""
    import numpy as np

    from h3fusion.judges import harmless
    from h3fusion.judges.embedder import Embedder
    from h3fusion.judges.fit import cache_root
    from h3fusion.judges.heads import load_lgb, logit

    rows = json.loads((directory / "rows.json").read_text())
    booster, embedder = load_lgb(judge / "head.lgb.txt"), Embedder(cache_root() / "embeddings.safetensors")
    return {part: np.asarray(logit(booster.predict(harmless.features(rows[part], embedder))))
            for part in ("calib", "val")}


def summarize(sweep_file: Path, directory: Path, out: Path, judge: Path | None) -> None:
    """A compact table (no logits) of every recipe and stage, with the judge's blend when ``judge`` is given:
    LightGBM logit + cross-encoder logit, weights fitted on the calibration slice and the intercept shifted so
    that the slice's flagged rate equals its unsafe rate (what ``h3fusion judges fit`` does)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    results = json.loads(sweep_file.read_text())
    rows = json.loads((directory / "rows.json").read_text())
    y_cal = np.array([r["harmful"] for r in rows["calib"]])
    y_val = np.array([r["harmful"] for r in rows["val"]])
    gb = lgbm_logits(directory, judge) if judge else None
    table, lines = {}, ["| recipe | stage | calib AUROC | val AUROC | val acc | val flagged (true "
                        f"{y_val.mean():.3f}) | blend val AUROC | blend val acc | blend flagged |", "|---" * 9 + "|"]
    for name, rec in results.items():
        if name.startswith("_"):
            continue
        for st in rec["stages"]:
            row = {k: v for k, v in st.items() if not k.endswith("_logits")}
            if gb is not None:
                xc = np.stack([gb["calib"], st["calib_logits"]], 1)
                xv = np.stack([gb["val"], st["val_logits"]], 1)
                w = LogisticRegression(C=1.0).fit(xc, y_cal).coef_[0]
                t = float(np.quantile(xc @ w, 1 - y_cal.mean()))
                sv = xv @ w
                row |= {"blend_val_auroc": auroc(y_val, sv), "blend_val_acc": float(((sv > t) == y_val).mean()),
                        "blend_val_flagged": float((sv > t).mean())}
            table.setdefault(name, {"recipe": rec["recipe"], "rows": rec["rows"], "stages": []})["stages"].append(row)
            blend = (f"{row['blend_val_auroc']:.3f} | {row['blend_val_acc']:.3f} | {row['blend_val_flagged']:.3f}"
                     if gb is not None else "– | – | –")
            lines.append(f"| {name} | {st['stage']} | {st['calib_auroc']:.3f} | {st['val_auroc']:.3f} | "
                         f"{st['val_acc_matched']:.3f} | {st['val_flagged_matched']:.3f} | {blend} |")
    out.write_text(json.dumps({"calib_rows": len(y_cal), "val_rows": len(y_val), "recipes": table}, indent=1) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump")
    d.add_argument("directory", type=Path)
    d.add_argument("--config", default="configs/demo.yaml")
    d.add_argument("--val-share", type=float, default=None, help="override the judge's VAL_SHARE")
    s = sub.add_parser("sweep")
    s.add_argument("directory", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--only", nargs="*", default=[])
    m = sub.add_parser("summarize")
    m.add_argument("sweep_file", type=Path)
    m.add_argument("directory", type=Path, help="the dump the sweep ran on")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--judge", type=Path, default=None, help="a fitted harmless judge directory, to blend with")
    args = parser.parse_args(argv)
    if args.command == "dump":
        dump(args.directory, args.config, args.val_share)
    elif args.command == "sweep":
        sweep(args.directory, args.out, args.only)
    else:
        summarize(args.sweep_file, args.directory, args.out, args.judge)


if __name__ == "__main__":
    sys.exit(main())
