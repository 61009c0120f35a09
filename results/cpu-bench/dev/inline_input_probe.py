"""Dev probe (session 20): does a dev set of held-out Alpaca instructions with their input inline (as AlpacaEval's
selfinstruct subset is written) reproduce H3Fusion's AlpacaEval refusals? With-input Alpaca rows outside the helpful dev
pool and outside every training sample of configs/cpu-bench.yaml; answers of h3fusion, the harmless expert and the base.
Run from the repo root with PYTHONPATH=src and H3FUSION_DATA_DIR set; writes runs/cpu-bench/dev/inline_input/<system>.jsonl."""
import json
import random
from pathlib import Path

import torch

from h3fusion.config import load_config
from h3fusion.data import helpful
from h3fusion.generate import generate_jsonl
from h3fusion.models import load_model
from h3fusion.refusal import is_refusal

torch.set_num_threads(2)
config = load_config("configs/cpu-bench.yaml")
trained = {e.source for e in helpful.load_train(config)}
cands = [e for e in helpful.outside_dev_pool(config) if e.input.strip() and e.source not in trained]
picked = random.Random(20261206).sample(cands, 96)
records = [{"id": i, "instruction": f"{e.instruction}\n\n{e.input}", "reference": e.response, "dataset": e.source}
           for i, e in enumerate(picked)]
print(len(cands), "candidates;", len(records), "prompts", flush=True)
out = Path("runs/cpu-bench/dev/inline_input")
for name, spec in (("h3fusion", "runs/cpu-bench/fused"), ("expert-harmless", "runs/cpu-bench/experts/harmless"),
                   ("base", "smollm2-135m")):
    model, tok = load_model(spec)
    path = out / f"{name}.jsonl"
    generate_jsonl(model, tok, records, path, max_new_tokens=128, batch_size=32,
                   stop_strings=config.generate.stop_strings, progress=False)
    rows = [json.loads(line) for line in path.open()]
    print(name, "refuses", round(sum(is_refusal(r["response"]) for r in rows) / len(rows), 3), flush=True)
