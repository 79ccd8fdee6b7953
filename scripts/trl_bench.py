#!/usr/bin/env python3
"""TRL side of the RL speed workloads W3 (PPO), W4 and W7 (GRPO), to run beside `rlft bench`.

Prints one JSON line per run on stdout (everything else, TRL/transformers logs included, goes
to stderr), e.g.

    {"workload": "W4", "impl": "trl-grpo", "trl": "1.16.0", "seconds_per_step": 0.107,
     "samples_per_s": 74.76, "steps_timed": 8, ..., "peak_rss_mb": 899.8, ...}

Usage (one workload per process, so peak_rss_mb is that workload's own):

    # W4, GRPO: the peer venv's own TRL (1.16)
    /work/peer/venv/bin/python scripts/trl_bench.py --workload W4 [--steps 8]

    # W3, PPO: TRL 1.12 (PPOTrainer lives in trl.experimental.ppo there and is gone from the
    # venv's TRL 1.16). /work/peer/trl112 is a `pip install --target` tree (trl/ plus
    # trl-1.12.0.dist-info/, no venv of its own): put it first on PYTHONPATH and use the peer
    # venv's python for torch/transformers/peft/accelerate/datasets.
    PYTHONPATH=/work/peer/trl112 /work/peer/venv/bin/python scripts/trl_bench.py --workload W3 [--steps 6]

    # W7, GRPO on a model folder (the real model, as `rlft bench --model M --workload W7`)
    /work/peer/venv/bin/python scripts/trl_bench.py --workload W7 --model DIR [--dtype bf16] [--steps 3]

  W7 matches src/bench/mod.rs w7: 64 chat prompts "What is a + b?" (a, b in 1..50; the
  model's chat template adds its system turn), 4 prompts x 8 generations = 32 completions of
  exactly 24 tokens (min_new_tokens = max_completion_length = 24: rlft sets no stop token),
  temperature 1, LoRA r=16 alpha=32 on every linear layer, the length reward (target 8),
  beta 0.04, one iteration, per_device_train_batch_size 32 (one optimizer step per 32
  completions), lr 1e-5, f32 or bf16 weights (--dtype; bf16 loads the model in bf16, as
  rlft's bf16 keeps the matrices in bf16), no gradient checkpointing. Timing as W4.

Run it on an otherwise idle machine: the line carries `other_procs_cpu_cores` (from the peer's
common.emit); above ~0.2 on a 2-core box the timing is contaminated by other processes.
`--peer-dir` (default /work/shared/peer) is where common.py is imported from (small_model_dir,
setup_threads, peak_rss_mb, emit); the random-weight model is made once under $PEER_WORK
(default /tmp/rlft-peer). BENCH_THREADS overrides the 2 threads, as in the other peer benches.

What is timed:
  W4: a TrainerCallback records time.perf_counter() at on_step_begin and on_step_end of every
      optimizer step; with per_device_train_batch_size 8 = 2 prompts x 4 generations and
      gradient_accumulation_steps 1, one step is generate (8 completions) + reward + reference
      log-probs + loss + backward + AdamW. `seconds_per_step` = median of (end - begin) over
      the steps after `--warmup` (default 2). `seconds_per_step_wall` = median gap between
      consecutive on_step_end calls (adds the Trainer's per-step logging and the dataloader).
      `rollout_s` = median time inside GRPOTrainer._generate_and_score_completions.
  W3: PPOTrainer.train() (trl 1.12) calls no on_step_begin, only on_step_end once per update
      (rollout of 8 + 4 PPO epochs over one mini-batch of 8). `seconds_per_step` = median gap
      between consecutive on_step_end calls (the first gap starts at on_train_begin), after
      skipping `--warmup` (default 1) updates, so it is the full update loop including TRL's
      per-update metric logging, gc.collect() and the dataloader. `generate_s` = median time
      inside ppo_trainer.batch_generation (the sampling of 16 tokens, patched in by module
      attribute); `gen_start_to_step_end_s` = median time from the start of that sampling to
      on_step_end (the update without TRL's post-step clean-up and the next batch fetch);
      `between_updates_s` = median time from on_step_end to the next update's sampling start
      (TRL's per-update gc.collect()/empty_cache and the dataloader).
  samples_per_s = 8 / seconds_per_step; peak_rss_mb = the process's max RSS (getrusage).
  --trl-defaults keeps TRL's gradient_checkpointing=True / bf16=True config defaults (see below)
  for comparison only; it is not the W3/W4 definition (PPOTrainer 1.12 ignores both anyway:
  its Accelerator gets no mixed_precision and it never enables checkpointing).

Shared setup (both workloads): the "small" Llama (hidden 256, 4 layers, 8 heads, 4 KV heads,
intermediate 688, vocab 512, random weights) from common.small_model_dir, f32, CPU
(use_cpu=True), 2 threads, LoRA r=4, alpha=8, dropout 0 on q_proj,v_proj (common.LORA_KW via
peft), 64 prompts = 6 random token ids in [3, 512) decoded to text (skip special tokens) and
re-tokenized as rlft does, 16 new tokens, temperature 1.0, top_k 0, top_p 1, lr 1e-5 constant
schedule, weight decay 0, no eval, no saving, report_to="none", dropout disabled.
TRL's base config defaults gradient_checkpointing=True and bf16=True (when fp16 is unset): both
are set False here, so TRL runs plain f32 without recomputation, as rlft does.

Deviations from rlft's W3/W4 (src/bench/mod.rs rl_step), all forced or chosen as noted:
  Both:
  - Prompts: same recipe (64 x 6 random ids, decode, re-tokenize with BOS) but drawn from
    Python's random.Random(2), not rlft's ChaCha8Rng(2), so the prompt texts (and hence their
    token lengths after re-tokenizing, ~7-13 tokens) differ from rlft's.
  - Optimizer: transformers' default `optim` (adamw_torch_fused: torch's fused AdamW, betas
    0.9/0.999, eps 1e-8); rlft uses its own AdamW. Same lr (1e-5), constant schedule, no warm-up.
  - Sampling/stopping: generation stops at the tokenizer's EOS like rlft (no extra stop ids);
    with random weights almost every completion runs the full 16 tokens in both (TRL's GRPO
    pads a batch to its longest completion, so one short completion saves nothing).
  W4 (GRPO, GRPOTrainer):
  - Reward: rlft's built-in `length` reward, target 8 (-|completion tokens - 8|) written as a
    Python reward function on `completion_ids` -- same definition.
  - Loss: TRL 1.16's defaults loss_type="dapo" (token mean over the batch; rlft's default
    loss_aggregation is token-mean too), scale_rewards="group", epsilon 0.2, num_iterations 1,
    beta 0.04 with the k3 KL against the adapter-disabled model (ref_model=None + peft: TRL's
    reference pass runs the policy with its adapter disabled, like rlft's). With
    num_iterations 1 and steps_per_generation = gradient_accumulation_steps = 1 TRL skips the
    separate "old policy" log-prob pass (it uses the detached current log-probs), as its
    defaults do; rlft's GRPO step has its own "policy" pass (see its phases).
  - Gradient clipping: max_grad_norm 1.0 (the Trainer's clip), as rlft's default.
  W3 (PPO, trl 1.12 experimental PPOTrainer):
  - Critic: TRL needs a separate value model; it is AutoModelForSequenceClassification
    (num_labels=1) loaded from the same small Llama weights (score head random, seed 0) and it
    is trained in full (all 3,033,600 parameters, no LoRA) together with the policy's LoRA
    (14,336) in one optimizer: 3,047,936 trainable. rlft's default critic is "shared": a
    value head on the policy's own hidden state, with the same adapter -- no second model
    forward/backward. This is the largest
    structural difference and makes TRL's update do more work.
  - Reward: PPOTrainer only takes a reward *model*, so the reward is the score of a second
    AutoModelForSequenceClassification (same weights, random score head, seed 1) on
    query+response -- one extra forward of the small model per rollout instead of rlft's
    cheap built-in `length` reward (no model); the reward values differ accordingly.
  - Reference: peft_config is given and ref_model=None, so the reference is the policy with
    its adapter disabled (as rlft).
  - batch 8 = per_device_train_batch_size 8, gradient_accumulation_steps 1,
    num_mini_batches 1, local_rollout_forward_batch_size 8, response_length 16,
    num_ppo_epochs 4, kl_coef 0.05 (k1), stop_token None, missing_eos_penalty None,
    whiten_rewards False, gamma 1, lam 0.95, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1
    (all equal to rlft's defaults). temperature set to 1.0 (TRL's PPO default is 0.7).
    num_sample_generations 0 (no sample tables). total_episodes = 8 x (warmup + steps).
  - No gradient clipping: trl 1.12's PPO loop calls optimizer.step() without clipping
    (max_grad_norm is ignored); rlft clips at 1.0.
  - With stop_token None TRL does not truncate responses at EOS; rlft stops a response at EOS
    (an EOS is sampled only now and then with random weights, so the shapes match nearly
    always).
"""
import argparse
import importlib
import os
import random
import statistics
import sys
import tempfile
import time

# Quiet, offline, no trackers -- before any HF import.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

BATCH = 8
NEW_TOKENS = 16
LR = 1e-5
LENGTH_TARGET = 8
W7_NEW_TOKENS = 24


def log(*a):
    print("[trl_bench]", *a, file=sys.stderr, flush=True)


def die(msg):
    print(f"trl_bench: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def load_common(peer_dir):
    path = os.path.abspath(peer_dir)
    if not os.path.exists(os.path.join(path, "common.py")):
        die(f"no common.py in --peer-dir {path}")
    sys.path.insert(0, path)
    sys.dont_write_bytecode = True  # leave no __pycache__ in the shared peer folder
    return importlib.import_module("common")


def make_prompts(tok, n=64, t=6, vocab=512, seed=2):
    rng = random.Random(seed)
    return [tok.decode([rng.randrange(3, vocab) for _ in range(t)], skip_special_tokens=True) for _ in range(n)]


def length_reward(completion_ids, **_):
    """rlft's `length` reward, target 8: -|completion tokens - 8|."""
    return [-abs(len(ids) - LENGTH_TARGET) for ids in completion_ids]


def trl_version():
    import trl
    return getattr(trl, "__version__", "unknown"), os.path.dirname(trl.__file__)


def common_args(out_dir, seed, trl_defaults=False):
    kw = dict(output_dir=out_dir, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                gradient_accumulation_steps=1, per_device_train_batch_size=BATCH,
                save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1,
                disable_tqdm=True, seed=seed, dataloader_num_workers=0, push_to_hub=False)
    if trl_defaults:  # leave TRL's own defaults: gradient_checkpointing=True, bf16=True (autocast)
        for k in ("bf16", "fp16", "gradient_checkpointing"):
            kw.pop(k)
    return kw


def median(xs):
    return round(statistics.median(xs), 4) if xs else None


def timed_grpo_trainer(GRPOTrainer):
    """A GRPOTrainer subclass that times each rollout, a callback that marks each step's begin
    and end, and the lists they fill: (Trainer class, callback, marks, rollout seconds)."""
    from transformers import TrainerCallback

    marks = {"begin": [], "end": []}
    rollout = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks["end"].append(time.perf_counter())
            log(f"step {state.global_step}: {marks['end'][-1] - marks['begin'][-1]:.3f} s")

    class TimedGRPO(GRPOTrainer):
        def _generate_and_score_completions(self, *args, **kw):
            t0 = time.perf_counter()
            r = super()._generate_and_score_completions(*args, **kw)
            rollout.append(time.perf_counter() - t0)
            return r

    return TimedGRPO, Timer(), marks, rollout


def step_times(marks, warmup):
    """Each step's end - begin after `warmup` steps (dies when none was timed)."""
    b, e = marks["begin"], marks["end"]
    n = min(len(b), len(e))
    step = [e[i] - b[i] for i in range(n)][warmup:]
    if not step:
        die(f"no steps timed ({n} steps ran, warm-up {warmup})")
    return step


def run_w4(common, a, out_dir):
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        v, p = trl_version()
        die(f"W4 needs trl.GRPOTrainer; the trl {v} at {p} has none ({e}). "
            "Run W4 with /work/peer/venv/bin/python (trl 1.16) and no PYTHONPATH.")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = common.small_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ds = Dataset.from_dict({"prompt": make_prompts(tok)})
    TimedGRPO, timer, marks, rollout = timed_grpo_trainer(GRPOTrainer)

    cfg_kw = dict(common_args(out_dir, a.seed, a.trl_defaults), max_steps=a.warmup + a.steps, num_generations=4,
                  max_completion_length=NEW_TOKENS, beta=0.04, temperature=1.0, top_k=0, top_p=1.0,
                  num_iterations=1, max_grad_norm=1.0, disable_dropout=True, log_completions=False)
    try:
        cfg = GRPOConfig(**cfg_kw)
    except TypeError as e:
        die(f"this trl's GRPOConfig does not take the needed options: {e}")
    log(f"GRPOConfig: bf16={cfg.bf16} gradient_checkpointing={cfg.gradient_checkpointing} optim={cfg.optim} "
        f"loss_type={cfg.loss_type} scale_rewards={cfg.scale_rewards} per_device_train_batch_size="
        f"{cfg.per_device_train_batch_size} num_generations={cfg.num_generations}")
    trainer = TimedGRPO(model=model, reward_funcs=length_reward, args=cfg, train_dataset=ds,
                        processing_class=tok, peft_config=LoraConfig(**common.LORA_KW), callbacks=[timer])
    log(f"model: {type(trainer.model).__name__}, dtype {next(trainer.model.parameters()).dtype}, "
        f"gradient checkpointing {getattr(trainer.model, 'is_gradient_checkpointing', None)}, "
        f"trainable {sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}")
    trainer.train()

    step = step_times(marks, a.warmup)
    e = marks["end"]
    wall = [e[i] - e[i - 1] for i in range(1, len(e))][max(0, a.warmup - 1):]
    s = statistics.median(step)
    return {"workload": "W4", "impl": "trl-grpo", "seconds_per_step": round(s, 4),
            "samples_per_s": round(BATCH / s, 2), "steps_timed": len(step),
            "seconds_per_step_wall": median(wall), "rollout_s": median(rollout[a.warmup:]),
            "seconds_per_step_min": round(min(step), 4), "seconds_per_step_max": round(max(step), 4),
            "prompts_per_step": 2, "num_generations": 4, "new_tokens": NEW_TOKENS, "beta": 0.04}


def run_w3(common, a, out_dir):
    try:
        ppo_mod = importlib.import_module("trl.experimental.ppo.ppo_trainer")
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as e:
        v, p = trl_version()
        die(f"W3 needs trl.experimental.ppo.PPOTrainer (trl 1.12); the trl {v} at {p} lacks it ({e}). "
            "Run W3 as: PYTHONPATH=/work/peer/trl112 /work/peer/venv/bin/python scripts/trl_bench.py --workload W3")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    d = common.small_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    policy = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(0)
    value_model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float32)
    torch.manual_seed(1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float32)
    for m in (value_model, reward_model):
        m.config.pad_token_id = tok.pad_token_id
    reward_model.requires_grad_(False)
    prompts = make_prompts(tok)
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})

    ends = []
    gen = []
    gen_start = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            log(f"update {state.global_step}: {ends[-1] - ends[-2]:.3f} s")

    orig_gen = ppo_mod.batch_generation

    def timed_batch_generation(*args, **kw):
        t0 = time.perf_counter()
        gen_start.append(t0)
        r = orig_gen(*args, **kw)
        gen.append(time.perf_counter() - t0)
        return r

    ppo_mod.batch_generation = timed_batch_generation

    n_updates = a.warmup + a.steps
    cfg_kw = dict(common_args(out_dir, a.seed, a.trl_defaults), num_mini_batches=1, local_rollout_forward_batch_size=BATCH,
                  total_episodes=BATCH * n_updates, response_length=NEW_TOKENS, num_ppo_epochs=4,
                  stop_token=None, missing_eos_penalty=None, temperature=1.0, kl_coef=0.05,
                  whiten_rewards=False, num_sample_generations=0)
    try:
        cfg = PPOConfig(**cfg_kw)
    except TypeError as e:
        die(f"this trl's PPOConfig does not take the needed options: {e}")
    log(f"PPOConfig: bf16={cfg.bf16} gradient_checkpointing={cfg.gradient_checkpointing} optim={cfg.optim} "
        f"total_episodes={cfg.total_episodes} temperature={cfg.temperature}")
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                         train_dataset=ds, value_model=value_model, peft_config=LoraConfig(**common.LORA_KW),
                         callbacks=[Timer()])
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    log(f"trainable parameters (policy LoRA + full value model): {n_train}")
    trainer.train()

    per = [ends[i] - ends[i - 1] for i in range(1, len(ends))][a.warmup:]
    if not per:
        die(f"no updates timed ({len(ends) - 1} ran, warm-up {a.warmup})")
    s = statistics.median(per)
    return {"workload": "W3", "impl": "trl-ppo", "seconds_per_step": round(s, 4),
            "samples_per_s": round(BATCH / s, 2), "steps_timed": len(per),
            "generate_s": median(gen[a.warmup:]),
            "gen_start_to_step_end_s": median([ends[i + 1] - gen_start[i] for i in range(len(gen_start))][a.warmup:]),
            "between_updates_s": median([gen_start[i] - ends[i] for i in range(1, len(gen_start))][max(0, a.warmup - 1):]),
            "seconds_per_step_min": round(min(per), 4), "seconds_per_step_max": round(max(per), 4),
            "batch": BATCH, "new_tokens": NEW_TOKENS, "num_ppo_epochs": 4, "trainable_params": n_train}


def run_w7(common, a, out_dir):
    from trl import GRPOConfig, GRPOTrainer
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not a.model:
        die("W7 needs --model DIR (the folder rlft converted the GGUF into, or any HF folder)")
    tok = AutoTokenizer.from_pretrained(a.model)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
    rng = random.Random(7)
    prompts = [[{"role": "user", "content": f"What is {rng.randrange(1, 50)} + {rng.randrange(1, 50)}?"}]
               for _ in range(64)]
    ds = Dataset.from_dict({"prompt": prompts})
    TimedGRPO, timer, marks, rollout = timed_grpo_trainer(GRPOTrainer)

    kw = common_args(out_dir, a.seed)
    kw.update(per_device_train_batch_size=32, bf16=False)
    cfg = GRPOConfig(**kw, max_steps=a.warmup + a.steps, num_generations=8,
                     max_completion_length=W7_NEW_TOKENS, beta=0.04, temperature=1.0, top_k=0, top_p=1.0,
                     num_iterations=1, max_grad_norm=1.0, disable_dropout=True, log_completions=False,
                     generation_kwargs={"min_new_tokens": W7_NEW_TOKENS})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = TimedGRPO(model=model, reward_funcs=length_reward, args=cfg, train_dataset=ds,
                        processing_class=tok, peft_config=lora, callbacks=[timer])
    log(f"W7: dtype {next(trainer.model.parameters()).dtype}, trainable "
        f"{sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}")
    trainer.train()
    step = step_times(marks, a.warmup)
    s = statistics.median(step)
    return {"workload": "W7", "impl": "trl-grpo", "seconds_per_step": round(s, 4),
            "samples_per_s": round(32 / s, 2), "steps_timed": len(step), "rollout_s": median(rollout[a.warmup:]),
            "seconds_per_step_min": round(min(step), 4), "seconds_per_step_max": round(max(step), 4),
            "prompts_per_step": 4, "num_generations": 8, "new_tokens": W7_NEW_TOKENS, "beta": 0.04,
            "dtype": a.dtype, "shape": a.model}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=["W3", "W4", "W7"])
    ap.add_argument("--model", default=None, help="W7: the model folder")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="W7: the weights' dtype")
    ap.add_argument("--steps", type=int, default=None, help="timed steps/updates (default W4: 8, W3: 6)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (default W4: 2, W3: 1)")
    ap.add_argument("--peer-dir", default="/work/shared/peer", help="folder holding the peer's common.py")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-defaults", action="store_true",
                    help="keep TRL's config defaults gradient_checkpointing=True and bf16=True instead of "
                         "forcing plain f32 without checkpointing (not the W3/W4 definition; for comparison)")
    a = ap.parse_args()
    if a.steps is None:
        a.steps = {"W4": 8, "W3": 6, "W7": 3}[a.workload]
    if a.warmup is None:
        a.warmup = 2 if a.workload == "W4" else 1
    if a.steps < 1 or a.warmup < 0:
        die("--steps must be >= 1 and --warmup >= 0")

    common = load_common(a.peer_dir)
    common.setup_threads(2)
    # Keep stdout for the one JSON line: TRL/transformers print logs (PrinterCallback) to stdout.
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        import trl  # noqa: F401
    except ImportError as e:
        die(f"trl is not importable with {sys.executable}: {e}")
    v, p = trl_version()
    log(f"python {sys.executable}, trl {v} from {p}")
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as out_dir:
        res = {"W4": run_w4, "W3": run_w3, "W7": run_w7}[a.workload](common, a, out_dir)
    import torch
    import transformers
    res = {"workload": res.pop("workload"), "impl": res.pop("impl"), "trl": v, **res,
           "peak_rss_mb": round(common.peak_rss_mb(), 1), "torch": torch.__version__,
           "transformers": transformers.__version__, "warmup_steps": a.warmup,
           "trl_defaults": a.trl_defaults}
    sys.stdout = real_stdout
    common.emit(res)


if __name__ == "__main__":
    main()
