#!/usr/bin/env python3
"""PyTorch replica of one nano training step, for `cnext bench step` (run by hand, never by
the tests).

    cargo run --release -p cnext-suite -- bench step --dump target/replica
    pip install torch safetensors
    python3 bench/step_replica.py target/replica --threads 2

It loads the weights and the two batches the Rust bench dumped (the inputs exactly as the
model sees them: token ids, patch pixels, gather indices, mask, labels), checks that its loss
of the first weights (no dropout) equals the Rust one, then times forward + loss, backward,
and clipping + AdamW, with the same LoRA (r, alpha, dropout on every decoder linear), the
same trainable set (LoRA factors and the projector at 1/10 of the rate) and the same
optimizer settings, and prints the same table: median ms of `--steps` steps after three
warm-up steps, the two batches interleaved step by step. It uses PyTorch's own fused ops
where PyTorch has them (rms_norm, scaled_dot_product_attention, cross_entropy): the fastest
eager form, not a literal op-for-op copy.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


class Nano:
    def __init__(self, weights, meta):
        self.cfg = meta["config"]
        self.lora = meta["lora"]
        self.w = {k: v.float() for k, v in weights.items()}
        self.params = {}
        for name in meta["trainable"]:
            p = self.w[name].clone().requires_grad_(True)
            self.params[name] = p
            self.w[name] = p
        self.scale = self.lora["alpha"] / self.lora["r"]
        c = self.cfg
        self.d, self.heads = c["hidden_size"], c["num_attention_heads"]
        self.hd = self.d // self.heads
        half = self.hd // 2
        pos = torch.arange(c["max_position_embeddings"], dtype=torch.float64)[:, None]
        i = torch.arange(half, dtype=torch.float64)[None, :]
        f = pos / c["rope_theta"] ** (2.0 * i / self.hd)
        self.cos, self.sin = f.cos().float(), f.sin().float()

    def linear(self, x, name, train):
        y = x @ self.w[f"{name}.weight"].T
        a = self.w.get(f"{name}.lora_A.default.weight")
        if a is None:
            return y
        b = self.w[f"{name}.lora_B.default.weight"]
        xin = F.dropout(x, self.lora["dropout"], training=train)
        return y + (xin @ a.T) @ b.T * self.scale

    def rms(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, self.cfg["rms_norm_eps"])

    def embed(self, inp):
        w, d = self.w, self.d
        b, t = inp["mask"].shape[0], inp["mask"].shape[-1]
        text = w["llm.embed_tokens.weight"][inp["ids"].long()]
        if "pixels" not in inp:
            return text.view(b, t, d)
        p = self.cfg["patch_size"]
        x = inp["pixels"].view(-1, p * p * 3)
        rows, cols = inp["patch_rows"].long(), inp["patch_cols"].long()
        h = x @ w["vision.patch_embed.weight"].T + w["vision.patch_embed.bias"]
        h = F.silu(h + w["vision.row_embed"][rows] + w["vision.col_embed"][cols])
        feats = h @ w["vision.fc.weight"].T + w["vision.fc.bias"]
        words = w["relevance.embed"][inp["relevance_ids"].long()].view(b, t, d)
        mean = (inp["relevance_weights"].view(b, 1, t) @ words).squeeze(1)
        unit = torch.ones(d)
        q = (F.rms_norm(mean, (d,), unit, 1e-5) @ w["relevance.query.weight"].T)
        q = q[inp["patch_owner"].long()]
        k = F.rms_norm(feats, (d,), unit, 1e-5) @ w["relevance.key.weight"].T
        gate = (k * q).sum(1) / d
        gate = (torch.tanh(gate * 0.5) + 1.0) * 0.5
        patches = feats @ w["projector.weight"].T + w["projector.bias"]
        patches = patches + gate[:, None] * w["relevance.flag"][None, :]
        return torch.cat([text, patches])[inp["gather"].long()].view(b, t, d)

    def loss(self, inp, train):
        w, d, nh, hd = self.w, self.d, self.heads, self.hd
        x = self.embed(inp)
        b, t, _ = x.shape
        pos = inp["positions"].long()
        cos = self.cos[pos].view(b, 1, t, hd // 2)
        sin = self.sin[pos].view(b, 1, t, hd // 2)
        mask = inp["mask"]

        def rope(y):
            y1, y2 = y[..., : hd // 2], y[..., hd // 2:]
            return torch.cat([y1 * cos - y2 * sin, y2 * cos + y1 * sin], -1)

        def heads(y):
            return y.view(b, t, nh, hd).transpose(1, 2)

        h = x
        for i in range(self.cfg["num_hidden_layers"]):
            pre = f"llm.layers.{i}"
            z = self.rms(h, w[f"{pre}.input_layernorm.weight"])
            q = rope(heads(self.linear(z, f"{pre}.self_attn.q_proj", train)))
            k = rope(heads(self.linear(z, f"{pre}.self_attn.k_proj", train)))
            v = heads(self.linear(z, f"{pre}.self_attn.v_proj", train))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            att = att.transpose(1, 2).reshape(b, t, d)
            h = h + self.linear(att, f"{pre}.self_attn.o_proj", train)
            z = self.rms(h, w[f"{pre}.post_attention_layernorm.weight"])
            g = F.silu(self.linear(z, f"{pre}.mlp.gate_proj", train))
            u = self.linear(z, f"{pre}.mlp.up_proj", train)
            h = h + self.linear(g * u, f"{pre}.mlp.down_proj", train)
        h = self.rms(h, w["llm.norm.weight"])
        hs = h.reshape(b * t, d)[inp["select"].long()]
        logits = hs @ w["lm_head.weight"].T
        return F.cross_entropy(logits, inp["labels"].long())


def lr_at(o, step, total):
    warm = max(1, math.ceil(total * o["warmup_ratio"]))
    if step < warm:
        return o["lr"] * (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    lo = o["lr"] * o["min_lr_ratio"]
    return lo + (o["lr"] - lo) * 0.5 * (1 + math.cos(math.pi * p))


class Runner:
    def __init__(self, task, weights, meta, inputs):
        self.task, self.inp = task, inputs
        self.model = Nano(weights, meta)
        o = meta["optim"]
        self.o = o
        groups = {}
        for name, p in self.model.params.items():
            s = max(((len(k), v) for k, v in o["lr_scale"].items() if name.startswith(k)),
                    default=(0, 1.0))[1]
            groups.setdefault(s, []).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "lr": o["lr"] * s, "scale": s} for s, ps in groups.items()],
            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
            weight_decay=o["weight_decay"])
        self.times = []

    def step(self, i, total):
        t0 = time.perf_counter()
        loss = self.model.loss(self.inp, train=True)
        lv = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(list(self.model.params.values()), self.o["grad_clip"])
        lr = lr_at(self.o, i, total)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["scale"]
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if not math.isfinite(lv):
            sys.exit(f"{self.task}: loss {lv} at step {i}")
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path, help="the folder `cnext bench step --dump` wrote")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = json.loads((args.dir / "meta.json").read_text())
    weights = load_file(args.dir / "weights.safetensors")
    runners = []
    for task in ["vqav2", "flickr30k"]:
        inputs = load_file(args.dir / f"{task}.safetensors")
        want = inputs.pop("loss").item()
        r = Runner(task, weights, meta, inputs)
        with torch.no_grad():
            got = r.model.loss(inputs, train=False).item()
        if abs(got - want) > 1e-4 * max(1.0, abs(want)):
            sys.exit(f"{task}: replica loss {got:.6f} != Rust loss {want:.6f}: not the same model")
        print(f"{task}: loss of the first weights {got:.6f} (Rust {want:.6f})", file=sys.stderr)
        runners.append(r)
    total = args.steps + 3
    for i in range(total):
        for r in runners:
            t = r.step(i, total)
            if i >= 3:
                r.times.append(t)
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.steps} steps after 3 warm-up steps, interleaved")
    print(f"{'batch':<10} {'batch x tokens':>15} {'forward ms':>11} {'backward ms':>12} "
          f"{'optimizer ms':>13} {'step ms':>8}")
    for r in runners:
        med = [statistics.median(x[k] for x in r.times) for k in range(3)]
        tot = statistics.median(sum(x) for x in r.times)
        b, t = r.inp["mask"].shape[0], r.inp["mask"].shape[-1]
        print(f"{r.task:<10} {f'{b} x {t}':>15} {med[0]:>11.1f} {med[1]:>12.1f} "
              f"{med[2]:>13.1f} {tot:>8.1f}")


if __name__ == "__main__":
    main()
