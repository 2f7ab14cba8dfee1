#!/usr/bin/env python3
"""tests/reference/make_train_references.py — what cpet's train/ tests compare against: PyTorch's optimizers,
HuggingFace's learning-rate schedules, clip_grad_norm_ and the losses, on small seeded tensors of awkward sizes.

Run once by a developer (needs PyPI torch and transformers); its output is committed, so the C++ tests need no
Python:

  python3 tests/reference/make_train_references.py

writes tests/reference/train_reference.json:

  adamw      torch.optim.AdamW (foreach=False: the single-tensor path cpet follows) on parameters of 1, 7 and 33
             values, the 7-value one in a group without weight decay (cpet's decay = false), 6 steps with given
             gradients and a learning rate that changes per step; the values after each step and the final moments.
  sgd        torch.optim.SGD the same way: momentum 0, momentum 0.9 with dampening 0.1, Nesterov 0.9, each with
             weight decay 0.01.
  schedule   transformers' get_{constant,linear,cosine}_schedule_with_warmup: the learning rate of steps 0..N.
  clip       torch.nn.utils.clip_grad_norm_ over three gradients: the returned norm and the clipped gradients, for a
             max_norm that clips and one that does not.
  losses     cross_entropy (ignore_index -100, mean), T^2 kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') and
             mse_loss over the selected rows: values and gradients from autograd.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [1, 7, 33]
STEPS = 6
LRS = [1e-2, 5e-3, 2e-2, 1e-3, 3e-2, 7e-3]


def flat(t):
    """float32 values as the shortest decimal that reads back to the same float."""
    return [float("%.9g" % x) for x in t.detach().reshape(-1).tolist()]


def seeded(seed, *shape, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).float()


def run_optimizer(make, decay_groups=True):
    params = [torch.nn.Parameter(seeded(100 + i, n)) for i, n in enumerate(SIZES)]
    init = [flat(p) for p in params]
    groups = [{"params": [params[0], params[2]]}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = make(groups if decay_groups else params)
    grads, after = [], []
    for s in range(STEPS):
        step_grads = [seeded(1000 + 10 * s + i, n, scale=0.5 + s) for i, n in enumerate(SIZES)]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = LRS[s]
        opt.step()
        grads.append([flat(g) for g in step_grads])
        after.append([flat(p) for p in params])
    state = {}
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            if k != "step" and torch.is_tensor(v):
                state["p%d.%s" % (i, k)] = flat(v)
    return {"sizes": SIZES, "decay": [True, False, True], "lrs": LRS, "init": init, "grads": grads, "after": after,
            "state": state}


def make_adamw():
    out = []
    for betas, eps, wd in [((0.9, 0.999), 1e-8, 0.01), ((0.8, 0.95), 1e-6, 0.1)]:
        r = run_optimizer(lambda g: torch.optim.AdamW(g, lr=1e-3, betas=betas, eps=eps, weight_decay=wd,
                                                      foreach=False))
        r.update({"beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": wd})
        out.append(r)
    return out


def make_sgd():
    out = []
    for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)]:
        r = run_optimizer(lambda g: torch.optim.SGD(g, lr=1e-3, momentum=momentum, dampening=dampening,
                                                    nesterov=nesterov, weight_decay=0.01, foreach=False))
        r.update({"momentum": momentum, "dampening": dampening, "nesterov": nesterov, "weight_decay": 0.01})
        out.append(r)
    return out


def make_schedules():
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)
    out = []
    for kind, warmup, total in [("constant", 3, 0), ("linear", 0, 7), ("linear", 3, 11), ("cosine", 0, 7),
                                ("cosine", 4, 13), ("linear", 1, 1)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=2e-3)
        if kind == "constant":
            sched = get_constant_schedule_with_warmup(opt, warmup)
        elif kind == "linear":
            sched = get_linear_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        lrs = []
        for _ in range(max(total, 8) + 2):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out.append({"kind": kind, "lr": 2e-3, "warmup": warmup, "total": total, "lrs": lrs})
    return out


def make_clip():
    out = []
    for max_norm in [1.0, 1000.0]:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in SIZES]
        grads = [seeded(2000 + i, n, scale=3.0) for i, n in enumerate(SIZES)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        out.append({"max_norm": max_norm, "grads": [flat(g) for g in grads], "norm": float(norm),
                    "clipped": [flat(p.grad) for p in params]})
    return out


def make_losses():
    ce = []
    for n, c, ignored in [(7, 33, [2, 5]), (33, 7, [0, 1, 32]), (1, 1, []), (5, 3, [0, 1, 2, 3])]:
        logits = seeded(3000 + n * c, n, c, scale=3.0).requires_grad_(True)
        g = torch.Generator().manual_seed(4000 + n)
        labels = torch.randint(0, c, (n,), generator=g)
        for r in ignored:
            labels[r] = -100
        loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="mean")
        loss.backward()
        ce.append({"rows": n, "cols": c, "logits": flat(logits), "labels": labels.tolist(), "loss": loss.item(),
                   "grad": flat(logits.grad)})
    kl = []
    for n, c, temperature in [(7, 33, 1.0), (3, 33, 2.5), (4, 7, 0.7), (1, 1, 3.0)]:
        s = seeded(5000 + n * c, n, c, scale=2.0).requires_grad_(True)
        t = seeded(6000 + n * c, n, c, scale=2.0)
        loss = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                        reduction="batchmean") * temperature ** 2
        loss.backward()
        kl.append({"rows": n, "cols": c, "temperature": temperature, "student": flat(s), "teacher": flat(t),
                   "loss": loss.item(), "grad": flat(s.grad)})
    mse = []
    for n, d, mask in [(7, 33, [1, 1, 0, 1, 0, 0, 1]), (3, 7, [1] * 3), (1, 1, [1])]:
        s = seeded(7000 + n * d, n, d).requires_grad_(True)
        t = seeded(8000 + n * d, n, d)
        m = torch.tensor(mask, dtype=torch.bool)
        loss = F.mse_loss(s[m], t[m])
        loss.backward()
        mse.append({"rows": n, "cols": d, "mask": mask, "student": flat(s), "teacher": flat(t), "loss": loss.item(),
                    "grad": flat(s.grad)})
    return {"cross_entropy": ce, "kl": kl, "mse": mse}


def main():
    torch.manual_seed(0)
    ref = {"torch": torch.__version__, "adamw": make_adamw(), "sgd": make_sgd(), "schedule": make_schedules(),
           "clip": make_clip(), "losses": make_losses()}
    path = os.path.join(HERE, "train_reference.json")
    with open(path, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
