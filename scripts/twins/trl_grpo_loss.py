"""TRL twin for the GRPO-family policy losses.

Calls TRL's own ``GRPOTrainer._compute_loss`` (unbound, on a minimal stub
object instead of a real trainer) on fixed, seeded float64 inputs, and writes
the returned loss and d loss / d logp for every case to a JSON fixture that
the Rust tests compare against (tolerance 1e-6).

Nothing here re-implements a TRL formula: the stub only supplies the
attributes ``_compute_loss`` reads, and ``_get_per_token_logps_and_entropies``
hands back a float64 leaf tensor built from the fixture's ``logp`` so that
``loss.backward()`` yields the gradient with respect to the per-token
log-probabilities.

Cases: loss_type in {grpo, dr_grpo, bnpo, dapo, cispo, sapo} x
importance_sampling_level in {token, sequence} x beta in {0.0, 0.04}, with
epsilon_high 0.28 (cispo: 1.1, a cap on the ratio itself), plus cispo with
epsilon_high 5.0 at token level for beta 0.0 and 0.04.

Run (TRL 1.16 lives in the peer venv):

    /work/peer/venv/bin/python scripts/twins/trl_grpo_loss.py tests/fixtures/trl_grpo_losses.json
"""

import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer

DTYPE = torch.float64
B, T = 5, 7
LENGTHS = [7, 4, 1, 6, 3]
ADVANTAGES = [1.2, -0.7, 0.5, -1.5, 0.0]
MAX_COMPLETION_LENGTH = 9  # deliberately > T
EPSILON_LOW = 0.2
SAPO_TEMPERATURE_POS = 1.0
SAPO_TEMPERATURE_NEG = 1.05
NOISE_STD = 0.3


class Recorder:
    """Plain attribute bag that records which attributes TRL actually read."""

    def __init__(self, name, accessed, **attrs):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_accessed", accessed)
        for k, v in attrs.items():
            object.__setattr__(self, k, v)

    def __getattribute__(self, key):
        if not key.startswith("__") and key not in ("_name", "_accessed"):
            object.__getattribute__(self, "_accessed").add(f"{object.__getattribute__(self, '_name')}.{key}")
        return object.__getattribute__(self, key)


def make_inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(B, T, dtype=torch.int64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logp = -3.0 + (3.0 - 0.1) * torch.rand(B, T, generator=g, dtype=DTYPE)
    old = logp + NOISE_STD * torch.randn(B, T, generator=g, dtype=DTYPE)
    ref = logp + NOISE_STD * torch.randn(B, T, generator=g, dtype=DTYPE)
    # Whole-row shifts so sequence-level ratios (GSPO) clip too: row 0 (A > 0) gets
    # ρ ≈ e^0.35 > 1 + ε_high, row 3 (A < 0) ρ below 1 − ε_low.
    old[0] -= 0.35
    old[3] += 0.45
    # Non-zero garbage at padding positions (moderate, so exp() stays finite and
    # 0 * x stays 0): a Rust implementation that ignores the mask will differ.
    pad = mask == 0
    for t, lo, hi in ((logp, 2.0, 6.0), (old, -7.0, -4.0), (ref, 3.0, 5.0)):
        garbage = lo + (hi - lo) * torch.rand(B, T, generator=g, dtype=DTYPE)
        t[pad] = garbage[pad]
    advantages = torch.tensor(ADVANTAGES, dtype=DTYPE)
    return logp, old, ref, advantages, mask


def run_case(loss_type, level, beta, epsilon_high, logp0, old, ref, advantages, mask, accessed):
    logp = logp0.clone().requires_grad_(True)

    def get_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == T and input_ids.shape == (B, 1 + T)
        return logp, torch.zeros(B, T, dtype=DTYPE), None

    identity = lambda x, **kw: x  # noqa: E731  (one process: gather/reduce are identity)
    accelerator = Recorder(
        "accelerator",
        accessed,
        num_processes=1,
        gather=identity,
        gather_for_metrics=identity,
        reduce=identity,
        sync_gradients=True,
    )
    args = Recorder(
        "args",
        accessed,
        use_bias_correction_kl=False,
        delta=None,
        sapo_temperature_pos=SAPO_TEMPERATURE_POS,
        sapo_temperature_neg=SAPO_TEMPERATURE_NEG,
        steps_per_generation=1,
    )
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stub = Recorder(
        "self",
        accessed,
        _get_per_token_logps_and_entropies=get_logps,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=args,
        loss_type=loss_type,
        epsilon_low=EPSILON_LOW,
        epsilon_high=epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics=metrics,
    )
    inputs = {
        "prompt_ids": torch.ones(B, 1, dtype=torch.int64),
        "prompt_mask": torch.ones(B, 1, dtype=torch.int64),
        "completion_ids": torch.arange(B * T, dtype=torch.int64).reshape(B, T) % 11 + 3,
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref

    loss = GRPOTrainer._compute_loss(stub, model=None, inputs=inputs)
    loss.backward()
    grad = logp.grad.detach()
    assert loss.dtype == DTYPE and grad.dtype == DTYPE
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all(), "gradient leaked into padding"
    return loss.item(), grad, {k: v[-1] for k, v in metrics["train"].items()}


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/trl_grpo_losses.json"
    torch.set_default_dtype(DTYPE)
    logp, old, ref, advantages, mask = make_inputs()
    n_tok = int(mask.sum())

    # Token-level ratios, to check the clip regions are actually exercised.
    valid = mask.bool()
    ratio = torch.exp(logp - old)
    adv = advantages.unsqueeze(1)
    hi = int(((ratio > 1 + 0.28) & (adv > 0) & valid).sum())
    lo = int(((ratio < 1 - EPSILON_LOW) & (adv < 0) & valid).sum())
    capped = int(((ratio > 1.1) & valid).sum())
    capped_pos = int(((ratio > 1.1) & (adv > 0) & valid).sum())
    print(f"token-level: {n_tok} valid tokens, clipped high {hi}, clipped low {lo}, "
          f"cispo(1.1) capped {capped} (with A>0: {capped_pos}), cispo(5.0) capped {int(((ratio > 5.0) & valid).sum())}")
    assert hi >= 1 and lo >= 1 and capped >= 1, "adjust the noise: clip regions not exercised"
    seq = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    seq_hi = int(((seq > 1 + 0.28) & (advantages > 0)).sum())
    seq_lo = int(((seq < 1 - EPSILON_LOW) & (advantages < 0)).sum())
    print(f"sequence-level ratios {seq.tolist()}: clipped high {seq_hi}, low {seq_lo}")
    assert seq_hi >= 1 and seq_lo >= 1, "adjust the row shifts: sequence clipping not exercised"

    specs = []
    for loss_type in ["grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo"]:
        for level in ["token", "sequence"]:
            for beta in [0.0, 0.04]:
                specs.append((loss_type, level, beta, 1.1 if loss_type == "cispo" else 0.28))
    specs += [("cispo", "token", 0.0, 5.0), ("cispo", "token", 0.04, 5.0)]

    accessed = set()
    cases = []
    for loss_type, level, beta, eps_hi in specs:
        loss, grad, m = run_case(loss_type, level, beta, eps_hi, logp, old, ref, advantages, mask, accessed)
        clip = ""
        if "clip_ratio/high_mean" in m:
            denom = n_tok if level == "token" else B
            clip = f"clip high {m['clip_ratio/high_mean'] * denom:.0f} low {m['clip_ratio/low_mean'] * denom:.0f}"
        elif "cispo_clip_ratio" in m:
            denom = n_tok if level == "token" else B
            clip = f"cispo clipped (A>0) {m['cispo_clip_ratio'] * denom:.0f}"
        print(f"{loss_type:8s} {level:8s} beta={beta:<5} eps_hi={eps_hi:<5} loss={loss:+.12f}  {clip}")
        cases.append({
            "loss_type": loss_type,
            "importance_sampling_level": level,
            "beta": beta,
            "epsilon_high": eps_hi,
            "loss": loss,
            "grad": grad.tolist(),
        })

    fixture = {
        "source": f"TRL {trl.__version__} GRPOTrainer._compute_loss via scripts/twins/trl_grpo_loss.py",
        "logp": logp.tolist(),
        "old_logp": old.tolist(),
        "ref_logp": ref.tolist(),
        "advantages": advantages.tolist(),
        "mask": mask.tolist(),
        "max_completion_length": MAX_COMPLETION_LENGTH,
        "epsilon_low": EPSILON_LOW,
        "sapo_temperature_pos": SAPO_TEMPERATURE_POS,
        "sapo_temperature_neg": SAPO_TEMPERATURE_NEG,
        "cases": cases,
    }
    with open(out_path, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print("stub attributes read by TRL:", ", ".join(sorted(accessed)))
    print(f"wrote {len(cases)} cases to {out_path}")


if __name__ == "__main__":
    main()
