"""TRL twin for the KTO loss.

Calls TRL's own ``KTOTrainer._compute_loss`` (unbound, on a minimal stub
object instead of a real trainer) on fixed float64 per-row log-probabilities,
and writes the loss, d loss / d policy_logps and the metrics TRL logged to a
JSON fixture that the Rust tests compare against (tolerance 1e-6).

Setup: ``precompute_ref_logps = True`` (reference log-probs come from
``inputs["ref_logps"]`` / ``inputs["ref_KL_logps"]``), ``loss_type = "kto"``,
``calculate_KL = True``. The stub's ``_compute_kl_logps`` returns the fixed
policy KL log-probs; the stub model returns ``.log_probs`` of shape [B, 1]
(input_ids are [B, 2], so L - 1 = 1) which is a float64 leaf holding the
policy log-probs, so the row sum TRL takes is the policy log-prob itself.
Nothing here re-implements a TRL formula.

Run (TRL 1.16 lives in the peer venv):

    /work/peer/venv/bin/python scripts/twins/trl_kto_loss.py tests/fixtures/trl_kto_loss.json
"""

import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl.trainer.kto_trainer import KTOTrainer

DTYPE = torch.float64
B = 6
METRIC_KEYS = ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"]


def make_cases():
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    cases = []
    # a. step 0: policy == reference everywhere -> every row's loss is 1 - sigmoid(0) = 0.5
    ref = -20.0 + 3.0 * randn(B)
    ref_kl = -20.0 + 3.0 * randn(B)
    cases.append(dict(name="step0", labels=[True, False, True, True, False, False],
                      policy_logps=ref.clone(), ref_logps=ref, policy_kl_logps=ref_kl.clone(), ref_kl_logps=ref_kl,
                      beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
    # b. mixed: policy = ref + N(0, 1); KL logps with a positive mean difference
    ref = -20.0 + 3.0 * randn(B)
    pol = ref + randn(B)
    ref_kl = -20.0 + 3.0 * randn(B)
    pol_kl = ref_kl + 1.5 + randn(B)
    labels_b = [True, False, False, True, True, False]
    assert (pol_kl - ref_kl).mean() > 0
    cases.append(dict(name="mixed", labels=labels_b, policy_logps=pol, ref_logps=ref,
                      policy_kl_logps=pol_kl, ref_kl_logps=ref_kl,
                      beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
    # c. weighted: same log-probs as b, larger beta and unequal class weights
    cases.append(dict(name="weighted", labels=labels_b, policy_logps=pol.clone(), ref_logps=ref.clone(),
                      policy_kl_logps=pol_kl.clone(), ref_kl_logps=ref_kl.clone(),
                      beta=0.5, desirable_weight=1.33, undesirable_weight=0.8))
    # d. negative KL estimate: TRL clamps the batch KL at 0
    ref = -20.0 + 3.0 * randn(B)
    pol = ref + randn(B)
    ref_kl = -20.0 + 3.0 * randn(B)
    pol_kl = ref_kl - 1.5 + randn(B)
    assert (pol_kl - ref_kl).mean() < 0
    cases.append(dict(name="negative_kl", labels=[False, True, True, False, True, False], policy_logps=pol,
                      ref_logps=ref, policy_kl_logps=pol_kl, ref_kl_logps=ref_kl,
                      beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
    # e. all desirable: no rejected rows at all
    ref = -20.0 + 3.0 * randn(B)
    pol = ref + randn(B)
    ref_kl = -20.0 + 3.0 * randn(B)
    pol_kl = ref_kl + 0.7 + randn(B)
    cases.append(dict(name="all_desirable", labels=[True] * B, policy_logps=pol, ref_logps=ref,
                      policy_kl_logps=pol_kl, ref_kl_logps=ref_kl,
                      beta=0.2, desirable_weight=1.0, undesirable_weight=1.0))
    return cases


class StubModel:
    """Stands in for the policy: returns per-token log-probs whose row sum is the fixed completion log-prob."""

    def __init__(self, log_probs):
        self.log_probs = log_probs
        self.calls = 0

    def __call__(self, input_ids, attention_mask, labels, fused_lm_head, use_cache=None, **kwargs):
        assert fused_lm_head is True and not kwargs, kwargs
        assert input_ids.shape == (B, 2) and labels.shape == (B, 2)
        self.calls += 1
        zeros = torch.zeros(B, 1, dtype=DTYPE)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros)


def run_case(c):
    policy = c["policy_logps"].clone().unsqueeze(1).requires_grad_(True)  # [B, 1] leaf
    model = StubModel(policy)
    kl_logps = c["policy_kl_logps"].clone()

    def compute_kl_logps(model_, batch):
        assert model_ is model
        return kl_logps

    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    identity = lambda x: x  # noqa: E731  (one process)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity),
        _compute_kl_logps=compute_kl_logps,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=c["beta"],
        desirable_weight=c["desirable_weight"],
        undesirable_weight=c["undesirable_weight"],
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
    )
    ones = torch.ones(B, 2, dtype=torch.int64)
    inputs = {
        "input_ids": torch.full((B, 2), 7, dtype=torch.int64),
        "attention_mask": ones.clone(),
        "completion_mask": ones.clone(),
        "KL_input_ids": torch.full((B, 2), 9, dtype=torch.int64),
        "KL_attention_mask": ones.clone(),
        "KL_completion_mask": ones.clone(),
        "label": torch.tensor(c["labels"], dtype=torch.bool),
        "ref_logps": c["ref_logps"].clone(),
        "ref_KL_logps": c["ref_kl_logps"].clone(),
    }
    loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    assert model.calls == 1
    loss.backward()
    assert loss.dtype == DTYPE and torch.isfinite(loss)
    grad = policy.grad.detach().squeeze(1)
    m = metrics["train"]
    logged = {k: (m[k][-1] if len(m.get(k, [])) else None) for k in METRIC_KEYS}
    return loss.item(), grad, logged


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/trl_kto_loss.json"
    out = []
    for c in make_cases():
        loss, grad, metrics = run_case(c)
        if c["name"] == "step0":
            assert abs(loss - 0.5) < 1e-15, loss
        print(f"{c['name']:14s} beta={c['beta']:<4} w=({c['desirable_weight']}, {c['undesirable_weight']}) "
              f"loss={loss:.12f} kl={metrics['kl']:.6f} mean(pkl-rkl)={(c['policy_kl_logps'] - c['ref_kl_logps']).mean().item():+.6f}")
        out.append({
            "name": c["name"],
            "labels": c["labels"],
            "policy_logps": c["policy_logps"].tolist(),
            "ref_logps": c["ref_logps"].tolist(),
            "policy_kl_logps": c["policy_kl_logps"].tolist(),
            "ref_kl_logps": c["ref_kl_logps"].tolist(),
            "beta": c["beta"],
            "desirable_weight": c["desirable_weight"],
            "undesirable_weight": c["undesirable_weight"],
            "loss": loss,
            "grad": grad.tolist(),
            "metrics": metrics,
        })
    fixture = {"source": f"TRL {trl.__version__} KTOTrainer._compute_loss via scripts/twins/trl_kto_loss.py",
               "cases": out}
    with open(out_path, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {len(out)} cases to {out_path}")


if __name__ == "__main__":
    main()
