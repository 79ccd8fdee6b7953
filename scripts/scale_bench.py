#!/usr/bin/env python3
"""The PyTorch twin of `rlft bench`'s real-size workloads (issue 13), on a model folder.

  W5  one SFT step with transformers + PEFT: LoRA r=16, alpha=32, dropout 0 on every linear layer but the
      head (target_modules="all-linear"), B x T random tokens, loss = the model's token-mean NLL
      (`labels=input_ids`), loss.backward(), torch.optim.AdamW(lr=1e-4) on the adapter, zero_grad.
      --gc turns on model.gradient_checkpointing_enable() (non-reentrant) + enable_input_require_grads().
  W6  model.generate on the plain model: B prompts of 16 random tokens, --len new tokens
      (min_new_tokens = max_new_tokens), do_sample, temperature 1, no top-k / top-p, KV cache.

--dtype bf16 loads the base in bfloat16 (PEFT keeps the adapter in float32, as rlft does); 2 threads.
--quantization nf4|fp4|int8 loads it with bitsandbytes (BitsAndBytesConfig, 4-bit with double
quantization, compute dtype --dtype) and, for W5, prepare_model_for_kbit_training: QLoRA.
Warm-up steps (calls), then the median of --steps. Prints one JSON line with the keys of
`rlft bench --json` (workload, seconds_per_step, tokens_per_s, samples_per_s, peak_rss_mb, ...), "impl":
"pytorch", and other_procs_cpu_cores (CPU other processes used meanwhile; > ~0.2 on 2 cores = contended).

Based on ../shared/peer/scale/peft_step.py and ../shared/peer/generate_bench.py; self-contained.
Usage: VENV/bin/python scripts/scale_bench.py MODEL_DIR --workload W5|W6 [--dtype f32|bf16] [--gc]
       [--batch B] [--len T] [--steps N] [--warmup N]
MODEL_DIR: e.g. `rlft bench --shape qwen2.5-0.5b --write-model DIR` (both sides then load the same weights).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time


def _busy_s():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


_T0, _BUSY0, _OWN0 = time.time(), _busy_s(), os.times()

import torch  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def other_procs_cpu_cores():
    wall = time.time() - _T0
    own = os.times()
    own_s = (own.user + own.system) - (_OWN0.user + _OWN0.system)
    return round(max(0.0, (_busy_s() - _BUSY0 - own_s) / wall), 2)


def random_ids(b, t, vocab, seed):
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def w5(model, a):
    from peft import LoraConfig, get_peft_model
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = random_ids(a.batch, a.len, model.config.vocab_size, 0)
    total, tf, tb, to = [], [], [], []
    loss = None
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        log(f"W5 step {i}: {t3 - t0:.3f} s (forward {t1 - t0:.3f}, backward {t2 - t1:.3f}, adamw {t3 - t2:.4f})")
        if i >= a.warmup:
            total.append(t3 - t0); tf.append(t1 - t0); tb.append(t2 - t1); to.append(t3 - t2)
    s = statistics.median(total)
    phases = {"adamw": statistics.median(to)}
    if not a.gc:  # with checkpointing the backward recomputes the forward: not separable
        phases.update(forward=statistics.median(tf), backward=statistics.median(tb))
    return {"workload": "W5", "seconds_per_step": s, "tokens_per_s": a.batch * a.len / s,
            "samples_per_s": a.batch / s, "steps_s": total, "phases": phases, "batch": a.batch, "seq": a.len,
            "gradient_checkpointing": a.gc, "trainable_params": sum(p.numel() for p in params),
            "loss": float(loss)}


def w6(model, a):
    model.eval()
    ids = random_ids(a.batch, 16, model.config.vocab_size, 1)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=a.len, min_new_tokens=a.len, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
              use_cache=True, pad_token_id=0)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.steps):
            torch.manual_seed(i)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            dt = time.perf_counter() - t0
            n_new = out.shape[1] - ids.shape[1]
            assert n_new == a.len, (n_new, a.len)
            log(f"W6 call {i}: {dt:.3f} s, {a.batch * n_new / dt:.1f} new tokens/s")
            if i >= a.warmup:
                times.append(dt)
    s = statistics.median(times)
    return {"workload": "W6", "seconds_per_step": s, "tokens_per_s": a.batch * a.len / s,
            "samples_per_s": a.batch / s, "ms_per_decode_step": 1000 * s / a.len, "steps_s": times,
            "batch": a.batch, "prompt_len": 16, "new_tokens": a.len}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--workload", choices=["W5", "W6"], required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--gc", action="store_true", help="W5 with gradient checkpointing")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--len", type=int, help="T for W5, new tokens for W6")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 2)))
    ap.add_argument("--quantization", choices=["none", "int8", "nf4", "fp4"], default="none",
                    help="the base in bitsandbytes' k bits (QLoRA; 4-bit with double quantization)")
    a = ap.parse_args()
    if a.gc and a.workload != "W5":
        ap.error("--gc applies to W5 only")
    a.batch = a.batch or (4 if a.workload == "W5" else 8)
    a.len = a.len or (256 if a.workload == "W5" else 64)
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    kw = {}
    if a.quantization != "none":
        # QLoRA's recipe: the frozen base in bitsandbytes' k bits (4-bit with double
        # quantization), computing in --dtype; W5 then prepares it for k-bit training.
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if a.quantization == "int8" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=a.quantization,
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
        kw["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, **kw)
    if a.quantization != "none" and a.workload == "W5":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gc)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    v = (w5 if a.workload == "W5" else w6)(model, a)
    v.update(load_s=load_s, params=n_params, peak_rss_mb=round(peak_rss_mb(), 1), dtype=a.dtype, device="cpu",
             quantization=(a.quantization + " (double quantization)" if a.quantization.endswith("4")
                           else a.quantization),
             shape=a.model, model_type=model.config.model_type, impl="pytorch", torch=torch.__version__,
             threads=torch.get_num_threads(), other_procs_cpu_cores=other_procs_cpu_cores())
    v.setdefault("gradient_checkpointing", False)
    print(json.dumps(v), flush=True)


if __name__ == "__main__":
    main()
