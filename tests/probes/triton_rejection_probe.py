"""Runs the Triton acceptance kernel and its torch reference on the same inputs; prints
one JSON line. Run with TRITON_INTERPRET=1 on a machine without a GPU."""
import json
import sys

import torch

from atlas_rl.kernels.rejection import rejection_sample

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
g = torch.Generator().manual_seed(0)
results = {}
V, S, L = 50, 12, 4
for kind in ("one-hot", "sparse", "dense"):
    counts = [4, 0, 2, 3, 1, 4, 3] * 4
    n = sum(counts)
    logits = torch.randn(n, V, generator=g) * 2
    p = torch.softmax(logits, -1)
    kwargs = {}
    if kind == "one-hot":
        x = p.argmax(-1)
        x[3] = -1  # a padded draft token
    else:
        top = p.argmax(-1)  # the support holds p's likeliest token (overlap with p) ...
        perms = [torch.randperm(V, generator=g) for _ in range(n)]
        ids = torch.stack([torch.cat([top[i:i + 1], perm[perm != top[i]][:S - 1]])
                           for i, perm in enumerate(perms)])  # ... and distinct ids
        q = p.gather(1, ids) + 0.05 * torch.rand(n, S, generator=g)  # close to p on ids
        q = q / q.sum(-1, keepdim=True)
        pick = torch.multinomial(q, 1, generator=g).squeeze(1)
        x = ids.gather(1, pick[:, None]).squeeze(1)
        if kind == "sparse":
            kwargs = dict(draft_probs=q, draft_ids=ids)
        else:
            dense = torch.zeros(n, V).scatter_(1, ids, q)
            kwargs = dict(draft_probs=dense)
    uniform = torch.rand(n, generator=g, dtype=torch.float64)
    recovery = torch.rand(len(counts), generator=g, dtype=torch.float64)
    bonus = torch.randint(0, V, (len(counts),), generator=g)
    outs = {}
    for backend in ("torch", "triton"):
        args = [t.to(device) for t in (x, logits, bonus, uniform, recovery)]
        kw = {k: v.to(device) for k, v in kwargs.items()}
        outs[backend] = rejection_sample(args[0], counts, args[1], args[2], args[3], args[4],
                                         L, backend=backend, **kw).cpu()
    # output tokens beyond one per request = accepted draft tokens
    results[kind] = {"equal": bool(torch.equal(outs["torch"], outs["triton"])),
                     "accepted": int((outs["torch"] >= 0).sum()) - len(counts),
                     "torch": outs["torch"].tolist(), "triton": outs["triton"].tolist()}
print(json.dumps(results))
