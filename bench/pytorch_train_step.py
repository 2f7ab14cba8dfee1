#!/usr/bin/env python3
"""Times the MiniLM-shaped LoRA training step that bench_train times in cpet (train_step/cpet/minilm_lora/32x64),
with PyTorch + PEFT on the CPU, at 1 and 2 threads.

    pip install torch transformers peft
    python3 bench/pytorch_train_step.py [--steps 10] [--warmup 2] [--threads 1 2]

The model is transformers' BertModel from a BertConfig of all-MiniLM-L6-v2's shape (6 layers, d 384, 12 heads,
d_ff 1536, vocab 30522, GELU-erf, LayerNorm eps 1e-12), randomly initialised (speed does not depend on the
values), with dropout 0: cpet has no dropout, and the comparison is of the same arithmetic. PEFT's
LoraConfig(r=8, lora_alpha=8, lora_dropout=0, target_modules=["query", "value"]) wraps it, so the backbone is
frozen and only the LoRA factors train; a torch.nn.Linear head over 6 labels on mean pooling (over the attention
mask) trains with them, as cpet's train::linear_head does. One step, the same as cpet's:

    optimizer.zero_grad(); h = model(ids, mask).last_hidden_state; logits = head(mean_pool(h, mask));
    loss = cross_entropy(logits, labels); loss.backward(); optimizer.step()    # AdamW(lr 1e-4, weight_decay 0.01)

on 32 sequences x 64 tokens (no padding), model.train(). It prints the median wall time of `--steps` steps after
`--warmup` warm-up steps and tokens/s = 2048 / median, per thread count, with torch's version and the CPU's name.
Tooling only: nothing in cpet's build or tests runs this.
"""
import argparse
import platform
import statistics
import time

import torch
import transformers
import peft

B, S, LABELS = 32, 64, 6


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build(seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, hidden_act="gelu", max_position_embeddings=512,
                                  layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = transformers.BertModel(cfg, add_pooling_layer=False)
    lora = peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], bias="none")
    model = peft.get_peft_model(base, lora)
    head = torch.nn.Linear(cfg.hidden_size, LABELS)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    return model, head, opt, params


def time_steps(threads, steps, warmup, seed=0):
    torch.set_num_threads(threads)
    model, head, opt, params = build(seed)
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 30522, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    labels = torch.randint(0, LABELS, (B,), generator=g)
    m = mask.unsqueeze(-1).float()

    def step():
        opt.zero_grad(set_to_none=False)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * m).sum(1) / m.sum(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.numel() for p in params)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    torch.set_num_interop_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{cpu_name()}; MiniLM-shaped LoRA step, {B} x {S} tokens, median of {a.steps} after {a.warmup} warm-up")
    for t in a.threads:
        med, n = time_steps(t, a.steps, a.warmup)
        print(f"train_step/pytorch_peft/minilm_lora/{B}x{S}/t{t}: {med * 1e3:8.1f} ms  {B * S / med:8.1f} tokens/s  "
              f"({n} trainable values)")


if __name__ == "__main__":
    main()
