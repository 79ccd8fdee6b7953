"""Cross-check rlft's outputs with transformers + PEFT (run by hand; needs torch, transformers,
peft — e.g. the peer venv of ../shared/peer/setup.sh).

usage: python scripts/peft_check.py RLFT_BINARY CASE...
  CASE is  adapter:MODEL_DIR:ADAPTER_DIR  (PeftModel.from_pretrained on an rlft-written adapter)
       or  model:MODEL_DIR                (AutoModelForCausalLM on an rlft-written folder)
For each case it scores a few texts with transformers (+PEFT) and with `rlft logprobs --json`
and prints the largest absolute log-prob difference.
"""
import json
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

TEXTS = ["12+35=47", "The quick brown fox jumps over the lazy dog. 7+8=15"]


def hf_logprobs(model, ids):
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
    return lp.tolist()


def main():
    binary, cases = sys.argv[1], sys.argv[2:]
    worst_all = 0.0
    for case in cases:
        kind, *paths = case.split(":")
        model = AutoModelForCausalLM.from_pretrained(paths[0], torch_dtype=torch.float32)
        args = [binary, "logprobs", "--model", paths[0], "--json"]
        if kind == "adapter":
            model = PeftModel.from_pretrained(model, paths[1])
            args += ["--adapter", paths[1]]
        model.eval()
        for t in TEXTS:
            args += ["--text", t]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        worst = 0.0
        for line, text in zip(out.splitlines(), TEXTS):
            ours = json.loads(line)
            # The same ids through transformers (its AutoTokenizer may pick a model-specific
            # class for some model types; the fixtures' reference ids are tokenizer.json's).
            lp = hf_logprobs(model, ours["input_ids"])
            worst = max(worst, max(abs(a - b) for a, b in zip(ours["logprobs"], lp)))
        print(f"{case}: max |Δ logprob| rlft vs transformers{'+PEFT' if kind == 'adapter' else ''} = {worst:.2e}")
        worst_all = max(worst_all, worst)
    sys.exit(0 if worst_all < 1e-4 else 1)


if __name__ == "__main__":
    main()
