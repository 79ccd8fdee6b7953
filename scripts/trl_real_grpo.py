"""TRL's twin of configs/real/grpo.toml: GRPO on SmolLM2-135M-Instruct (the same GGUF, read by
transformers' GGUF loader, f32) for the same prompts, reward, adapter and hyper-parameters, with
held-out accuracy (greedy, the same 50 sums, last number of the reply) before and after, and the
time per step. Prints one JSON line.

    PEER_VENV/bin/python scripts/trl_real_grpo.py [--gguf FILE] [--steps 24]

Settings as in the rlft config: LoRA r=16, alpha=32, all-linear, dropout 0; 4 prompts x 8
completions a step (per_device_train_batch_size 32, one optimizer step per generation), 12 new
tokens, temperature 1.0 (top_k 0, top_p 1), beta 0.02 (k3 KL to the adapter-free reference),
epsilon 0.2, one PPO epoch, scale_rewards "group", loss_type "dapo" (the token mean over the
batch, rlft's token_mean), lr 2e-4 constant, no warmup, AdamW (weight decay 0), max_grad_norm 1,
seed 42, f32 on 2 CPU threads, no gradient checkpointing.
"""

import argparse
import json
import os
import re
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(name):
    with open(os.path.join(HERE, "..", "configs", "real", "data", f"sums_{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_number(text):
    nums = re.findall(r"-?\d+(?:\.\d+)?", text)
    return float(nums[-1]) if nums else None


def correct(text, answer):
    n = last_number(text)
    return 1.0 if n is not None and abs(n - float(answer)) < 1e-9 else 0.0


def accuracy(model, tok, data):
    model.eval()
    hits = 0.0
    for r in data:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        hits += correct(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), r["answer"])
    return hits / len(data)


class Timer(TrainerCallback):
    def __init__(self):
        self.begin, self.steps = None, []

    def on_step_begin(self, args, state, control, **kw):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(time.perf_counter() - self.begin)


def main():
    ap = argparse.ArgumentParser()
    cache = os.environ.get("RLFT_REAL_MODELS", os.path.expanduser("~/.cache/rlft/real-models"))
    ap.add_argument("--gguf", default=os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(42)
    d, f = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # A GGUF-loaded model is marked quantized (the Trainer refuses it, save_pretrained too): copy
    # its dequantized f32 weights into a plain model of the same config.
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    evalset = rows("eval")
    before = accuracy(model, tok, evalset)

    def reward(completions, answer, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [correct(t, a) for t, a in zip(texts, answer)]

    train = Dataset.from_list(rows("train"))
    cfg = GRPOConfig(
        output_dir="/tmp/trl-real-grpo", max_steps=args.steps, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=32, num_generations=8, steps_per_generation=1,
        max_completion_length=12, temperature=1.0, top_k=0, top_p=1.0, beta=0.02, epsilon=0.2,
        num_iterations=1, scale_rewards="group", loss_type="dapo", seed=42, use_cpu=True,
        bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_dropout=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=train,
                          processing_class=tok, peft_config=lora, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after = accuracy(trainer.model, tok, evalset)
    steps = sorted(timer.steps)
    print(json.dumps({
        "impl": "trl-grpo", "steps": args.steps, "train_s": round(train_s, 1),
        "seconds_per_step_median": round(steps[len(steps) // 2], 2),
        "heldout_before": before, "heldout_after": after,
        "reward_per_step": [round(x["reward"], 4) for x in trainer.state.log_history if "reward" in x],
    }))


if __name__ == "__main__":
    main()
