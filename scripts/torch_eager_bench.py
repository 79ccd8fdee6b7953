#!/usr/bin/env python3
"""PyTorch eager speed baseline for the rlft workloads W1 (LoRA train step) and W2 (KV-cache generation).

Only `torch` + the standard library (no transformers/peft, no torch.compile). The model is a hand-written
Llama decoder (HF LlamaForCausalLM semantics: RMSNorm eps 1e-6 computed in f32, GQA attention via
F.scaled_dot_product_attention with HF `repeat_kv`, rotate_half RoPE theta 1e4, SiLU-gated MLP, untied
lm_head), random weights from a fixed seed (normal std 0.02, norm weights 1). LoRA r=4 alpha=8 on q_proj and
v_proj: y = W x + 2 * B(A x); A kaiming-uniform (as peft), B small random (peft uses 0; random keeps the
benchmark non-degenerate). Base weights frozen; only A, B trainable.

Shapes (--shape):
  small: hidden 256, 4 layers, 8 heads / 4 kv heads, intermediate 688, vocab 512.   W1 B=8 T=64;  W2 B=8,  64 new
  gpu:   hidden 1024, 8 layers, 16 heads / 8 kv heads, intermediate 2816, vocab 32000. W1 B=8 T=256; W2 B=64, 128 new

Workloads (--workloads, one JSON line each on stdout; logs go to stderr):
  W1   forward + backward + AdamW(lr 1e-4) step; loss = mean next-token NLL (log_softmax in f32). Median over reps
       of the step time and of the forward/backward/adamw phases (each phase ends with a device sync).
  W2   generation, adapter merged into q/v: 7-token random prompt per row, prefill + one-token decode steps with
       a preallocated KV cache, temperature-1 multinomial sampling (seeded), no early stop. Timed: cache
       allocation + prefill + all decode steps + sampling, synchronized. tokens_per_s = B*new / seconds (median).
  W2u  the same with the adapter unmerged (LoRA applied on the fly).
  peak square matmul (8192^3 on cuda, 2048^3 on cpu) in bf16 and in f32 without TF32: achievable matmul peak.

f32 is real f32: torch.backends.cuda.matmul.allow_tf32 = False (and cudnn too), so it is comparable with the
Rust f32 path. With --dtype bf16 the weights, LoRA params and AdamW state are all bf16 (no f32 master weights).

Run:  python3 scripts/torch_eager_bench.py --shape gpu --dtype bf16
      python3 scripts/torch_eager_bench.py --device cpu --shape small --reps 3 --warmup 1
      python3 scripts/torch_eager_bench.py --device cpu --check      # correctness checks, prints {"check":"ok"}
"""
import argparse, json, math, statistics, sys, time
import torch
import torch.nn.functional as F

SHAPES = {"small": dict(hidden=256, layers=4, heads=8, kv=4, inter=688, vocab=512, w1=(8, 64), w2=(8, 64)),
          "gpu": dict(hidden=1024, layers=8, heads=16, kv=8, inter=2816, vocab=32000, w1=(8, 256), w2=(64, 128))}
R, ALPHA, EPS, THETA, PROMPT = 4, 8, 1e-6, 10000.0, 7
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Lin(torch.nn.Module):
    """Frozen bias-free Linear, optionally with LoRA; merge() folds scale*B@A into W (unmerge() restores W)."""
    def __init__(self, i, o, lora=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(o, i) * 0.02, requires_grad=False)
        self.lora, self.merged = lora, False
        if lora:
            self.A = torch.nn.Parameter(torch.empty(R, i))
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B = torch.nn.Parameter(torch.randn(o, R) * 0.02)

    @torch.no_grad()
    def merge(self):
        self.w0 = self.weight.detach().clone()
        self.weight += (ALPHA / R) * (self.B @ self.A)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        self.weight.copy_(self.w0)
        self.merged, self.w0 = False, None

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.lora and not self.merged:
            y = y + (ALPHA / R) * F.linear(F.linear(x, self.A), self.B)
        return y


class RMSNorm(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(h), requires_grad=False)

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rope(x, cos, sin):  # HF rotate_half convention; x [B, H, T, hd], cos/sin [T, hd]
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


class Layer(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden"], c["heads"], c["kv"]
        self.hd = h // self.nh
        self.ln1, self.ln2 = RMSNorm(h), RMSNorm(h)
        self.q, self.k = Lin(h, self.nh * self.hd, True), Lin(h, self.nkv * self.hd)
        self.v, self.o = Lin(h, self.nkv * self.hd, True), Lin(self.nh * self.hd, h)
        self.gate, self.up, self.down = Lin(h, c["inter"]), Lin(h, c["inter"]), Lin(c["inter"], h)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, _ = x.shape
        h = self.ln1(x)
        q = rope(self.q(h).view(B, T, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = rope(self.k(h).view(B, T, self.nkv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(h).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if cache is not None:  # preallocated [B, nkv, max_len, hd]
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        assert T == 1 or pos == 0, "multi-token chunks only at position 0 (is_causal is top-left aligned)"
        rep = self.nh // self.nkv  # HF repeat_kv: q head j uses kv head j // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(torch.nn.Module):
    def __init__(self, c, max_pos=4096):
        super().__init__()
        self.c = c
        self.embed = torch.nn.Parameter(torch.randn(c["vocab"], c["hidden"]) * 0.02, requires_grad=False)
        self.layers = torch.nn.ModuleList(Layer(c) for _ in range(c["layers"]))
        self.norm, self.lm_head = RMSNorm(c["hidden"]), Lin(c["hidden"], c["vocab"])
        hd = c["hidden"] // c["heads"]
        inv = 1.0 / THETA ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        emb = torch.cat((f, f), -1)  # computed in f32, cast with the model like HF casts cos/sin to x.dtype
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids, caches=None, pos=0, last_only=False):
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[pos:pos + ids.shape[1]], self.sin[pos:pos + ids.shape[1]]
        for i, l in enumerate(self.layers):
            x = l(x, cos, sin, None if caches is None else caches[i], pos)
        x = self.norm(x)
        return self.lm_head(x[:, -1:] if last_only else x)

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, Lin) and m.lora]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def nll(logits, ids):
    return -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).mean()


def w1(model, B, T, a, dev):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, model.c["vocab"], (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
    ts = {"forward": [], "backward": [], "adamw": [], "step": []}
    for i in range(a.warmup + a.reps):
        sync(dev); t0 = time.perf_counter()
        loss = nll(model(ids), ids)
        sync(dev); t1 = time.perf_counter()
        loss.backward()
        sync(dev); t2 = time.perf_counter()
        opt.step(); opt.zero_grad(set_to_none=True)
        sync(dev); t3 = time.perf_counter()
        if i == 0:
            loss0 = loss.item()
        if i >= a.warmup:
            for k, v in zip(ts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                ts[k].append(v)
        log(f"W1 step {i}: {t3 - t0:.4f}s loss {loss.item():.4f}")
    med = {k: statistics.median(v) for k, v in ts.items()}
    # Linear FLOPs only: 2*P*B*T forward + 2*P*B*T input-gradients in backward (frozen base: no weight grads;
    # LoRA and attention-score FLOPs, ~4% at the gpu shape, are ignored).
    p_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, Lin))
    flops = 4 * p_lin * B * T
    return {"seconds_per_step": med["step"], "tokens_per_s": B * T / med["step"],
            "phases": {k: med[k] for k in ("forward", "backward", "adamw")}, "batch": B, "seq": T,
            "flops_per_step": flops, "tflops": flops / med["step"] / 1e12, "p_linear": p_lin,
            "trainable_params": sum(p.numel() for p in params), "loss_step0": loss0, "ln_vocab": math.log(model.c["vocab"])}


@torch.inference_mode()
def generate(model, prompt, new, gen):
    c, (B, dev) = model.c, (prompt.shape[0], prompt.device)
    hd, dt = c["hidden"] // c["heads"], model.embed.dtype
    caches = [tuple(torch.empty(B, c["kv"], PROMPT + new, hd, device=dev, dtype=dt) for _ in range(2))
              for _ in range(c["layers"])]
    logits, out = model(prompt, caches, 0, last_only=True), []
    for i in range(new):
        tok = torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=gen)
        out.append(tok)
        if i + 1 < new:
            logits = model(tok, caches, PROMPT + i, last_only=True)
    return torch.cat(out, 1), logits[:, -1].float()


def w2(model, B, N, a, dev, merged):
    prompt = torch.randint(3, model.c["vocab"], (B, PROMPT), generator=torch.Generator().manual_seed(2)).to(dev)
    for m in model.lora_layers() if merged else []:
        m.merge()
    ts = []
    for i in range(a.warmup + a.reps):
        gen = torch.Generator(device=dev).manual_seed(3)
        sync(dev); t0 = time.perf_counter()
        generate(model, prompt, N, gen)
        sync(dev); ts.append(time.perf_counter() - t0)
        log(f"W2{'' if merged else 'u'} rep {i}: {ts[-1]:.4f}s")
    for m in model.lora_layers() if merged else []:
        m.unmerge()
    s = statistics.median(ts[a.warmup:])
    return {"tokens_per_s": B * N / s, "seconds": s, "batch": B, "new": N, "prompt": PROMPT}


def peak(dev, reps):
    n, res = (8192, {}) if dev.type == "cuda" else (2048, {})
    for dt in (torch.bfloat16, torch.float32):
        x, y = (torch.randn(n, n, device=dev, dtype=dt) for _ in range(2))
        for _ in range(3):
            x @ y
        sync(dev); t0 = time.perf_counter()
        for _ in range(reps):
            x @ y
        sync(dev); res[dt] = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
    return {"workload": "matmul_peak", "dtype": "bf16", "tflops": res[torch.bfloat16],
            "f32_no_tf32_tflops": res[torch.float32], "n": n, "reps": reps}


def check(c, dev):
    torch.manual_seed(0)
    model = Llama(c).to(dev)
    ids = torch.randint(3, c["vocab"], (4, 32), device=dev)
    loss = nll(model(ids), ids).item()
    assert abs(loss - math.log(c["vocab"])) < 0.5, (loss, math.log(c["vocab"]))
    prompt = torch.randint(3, c["vocab"], (4, PROMPT), device=dev)
    tu, lu = generate(model, prompt, 16, torch.Generator(device=dev).manual_seed(3))
    with torch.inference_mode():  # KV-cache decode == full causal forward for the last sampled position
        full = model(torch.cat((prompt, tu[:, :-1]), 1))[:, -1].float()
    assert torch.allclose(lu, full, atol=1e-4, rtol=1e-4), (lu - full).abs().max()
    for m in model.lora_layers():
        m.merge()
    tm, lm = generate(model, prompt, 16, torch.Generator(device=dev).manual_seed(3))
    assert torch.equal(tu, tm), "merged vs unmerged tokens differ"
    log(f"check: loss0 {loss:.4f} vs ln V {math.log(c['vocab']):.4f}; cache-vs-full max diff "
        f"{(lu - full).abs().max():.2e}; merged-vs-unmerged logits max diff {(lu - lm).abs().max():.2e}")
    print(json.dumps({"check": "ok", "loss0": loss, "ln_vocab": math.log(c["vocab"])}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--batch", type=int), ap.add_argument("--seq", type=int), ap.add_argument("--new", type=int)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workloads", default="W1,W2,W2u,peak")
    ap.add_argument("--check", action="store_true", help="f32 correctness checks only; prints {\"check\":\"ok\"}")
    a = ap.parse_args()
    c, dev = SHAPES[a.shape], torch.device(a.device)
    if a.check:
        return check(c, dev)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    model = Llama(c).to(dev, dt)
    base = {"impl": "torch-eager", "device": dev.type, "dtype": a.dtype, "shape": a.shape, "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "tf32": torch.backends.cuda.matmul.allow_tf32, "reps": a.reps, "warmup": a.warmup}
    if a.dtype == "bf16":
        base["note"] = "bf16 weights+LoRA; AdamW directly on bf16 LoRA params (no f32 master copy)"
    for w in a.workloads.split(","):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        if w == "W1":
            r = {"workload": "W1", **base, **w1(model, a.batch or c["w1"][0], a.seq or c["w1"][1], a, dev)}
        elif w in ("W2", "W2u"):
            r = {"workload": w, **base, **w2(model, a.batch or c["w2"][0], a.new or c["w2"][1], a, dev, w == "W2")}
        elif w == "peak":
            r = {"workload": "matmul_peak", **base, **peak(dev, 10 if dev.type == "cuda" else a.reps)}
        else:
            sys.exit(f"unknown workload {w}")
        if dev.type == "cuda":
            r["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
