"""Cross-check `rlft pairs` (DPO log-probs and losses, reward-model scores) with transformers +
PEFT (run by hand, or through scripts/preference_check.sh; needs torch, transformers, peft and
safetensors — e.g. the peer venv of ../shared/peer/setup.sh).

usage: python scripts/preference_check.py RLFT_BINARY MODEL_DIR PAIRS_JSONL DPO_ADAPTER RM_ADAPTER
  DPO_ADAPTER  a PEFT CAUSAL_LM adapter (`rlft dpo`); policy = adapter on, reference = adapter off
  RM_ADAPTER   a PEFT SEQ_CLS adapter (`rlft rm`); also merged with `rlft merge` and checked as
               an AutoModelForSequenceClassification folder
Runs `rlft pairs --json` on the same ids, recomputes every number in torch (batch of one, no
padding), prints the largest absolute difference per quantity and exits 1 if any exceeds 1e-4.
"""
import json
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

BETA = 0.1
TOL = 1e-4


def rlft_pairs(binary, model_dir, pairs, dpo_adapter, reward_model):
    out = subprocess.run(
        [binary, "pairs", "--model", model_dir, "--adapter", dpo_adapter, "--data", pairs,
         "--reward-model", reward_model, "--beta", str(BETA), "--json"],
        capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def completion_logps(model, prompt_ids, completion_ids):
    """(sum, mean) of the completion tokens' log-probs given prompt + completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
    lp = lp[len(prompt_ids) - 1:]  # the log-probs of the completion tokens only
    return lp.sum().item(), lp.mean().item()


def dpo_losses(pol, ref, pol_mean, ref_mean):
    """TRL's sigmoid / hinge / ipo losses (label_smoothing 0; IPO on per-token means)."""
    delta = torch.tensor((pol[0] - ref[0]) - (pol[1] - ref[1]), dtype=torch.float64)
    delta_mean = torch.tensor((pol_mean[0] - ref_mean[0]) - (pol_mean[1] - ref_mean[1]),
                              dtype=torch.float64)
    return {"dpo_loss_sigmoid": -F.logsigmoid(BETA * delta).item(),
            "dpo_loss_hinge": torch.relu(1 - BETA * delta).item(),
            "dpo_loss_ipo": ((delta_mean - 1 / (2 * BETA)) ** 2).item()}


def score(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def main():
    binary, model_dir, pairs, dpo_adapter, rm_adapter = sys.argv[1:6]
    worst = {}

    def note(key, ours, theirs):  # numbers or tensors; compared in float64
        f64 = torch.float64
        diff = torch.as_tensor(ours, dtype=f64) - torch.as_tensor(theirs, dtype=f64)
        worst[key] = max(worst.get(key, 0.0), diff.abs().max().item())

    with tempfile.TemporaryDirectory() as merged:
        subprocess.run([binary, "merge", "--model", model_dir, "--adapter", rm_adapter,
                        "--out", merged], capture_output=True, check=True)
        rows = rlft_pairs(binary, model_dir, pairs, dpo_adapter, rm_adapter)
        rows_merged = rlft_pairs(binary, model_dir, pairs, dpo_adapter, merged)
        assert rows and len(rows) == len(rows_merged), "rlft pairs printed no / unequal rows"

        # Policy (adapter on) and reference (adapter off) log-probs, then the DPO losses.
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        policy = PeftModel.from_pretrained(policy, dpo_adapter).eval()
        for row in rows:
            seqs = [row["chosen_ids"], row["rejected_ids"]]
            pol = [completion_logps(policy, row["prompt_ids"], c) for c in seqs]
            with policy.disable_adapter():
                ref = [completion_logps(policy, row["prompt_ids"], c) for c in seqs]
            for key, vals in [("policy_logps", [p[0] for p in pol]),
                              ("policy_logps_mean", [p[1] for p in pol]),
                              ("reference_logps", [r[0] for r in ref]),
                              ("reference_logps_mean", [r[1] for r in ref])]:
                for ours, theirs in zip(row[key], vals):
                    note(key, ours, theirs)
            losses = dpo_losses([p[0] for p in pol], [r[0] for r in ref],
                                [p[1] for p in pol], [r[1] for r in ref])
            for key, theirs in losses.items():
                note(key, row[key], theirs)

        # Reward model: the PEFT SEQ_CLS adapter, then the merged folder.
        rm = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32)
        rm = PeftModel.from_pretrained(rm, rm_adapter).eval()
        # A head PEFT failed to load would be transformers' random init: compare with the file.
        saved = load_file(f"{rm_adapter}/adapter_model.safetensors")
        saved = saved["base_model.model.score.weight"]
        head = rm.base_model.model.score.modules_to_save["default"].weight
        note("score.weight (PEFT vs adapter file)", head.detach(), saved)
        rm_merged, info = AutoModelForSequenceClassification.from_pretrained(
            merged, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"], f"merged folder lacks {info['missing_keys']}"
        note("score.weight (merged vs adapter file)", rm_merged.score.weight.detach(), saved)
        rm_merged.eval()
        for model, rs, key in [(rm, rows, "rm_scores (adapter)"),
                               (rm_merged, rows_merged, "rm_scores (merged)")]:
            for row in rs:
                for ours, c in zip(row["rm_scores"], [row["chosen_ids"], row["rejected_ids"]]):
                    note(key, ours, score(model, row["prompt_ids"] + c))

    for key, value in worst.items():
        print(f"max |Δ| {key:40s} = {value:.2e}")
    ok = max(worst.values()) <= TOL
    print(f"{len(rows)} pairs; {'OK' if ok else 'FAIL'} (tolerance {TOL:g})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
