"""The real-model GRPO recipe's prompts: sums of a number up to 19 and a digit, asked as a chat
user turn, with the answer for the `numeric_match` reward. 171 pairs, a seeded shuffle: 121 to
train on, 50 held out. Rerun to regenerate configs/real/data/*.jsonl (deterministic)."""
import json
import random
import os

pairs = [(a, b) for a in range(1, 20) for b in range(1, 10)]
random.Random(23).shuffle(pairs)
here = os.path.dirname(os.path.abspath(__file__))
for name, rows in (("train", pairs[50:]), ("eval", pairs[:50])):
    with open(os.path.join(here, "data", f"sums_{name}.jsonl"), "w") as f:
        for a, b in rows:
            msg = [{"role": "user", "content": f"What is {a} + {b}?"}]
            f.write(json.dumps({"prompt": msg, "answer": str(a + b)}) + "\n")
