"""Runs the Triton verification (kernels/rejection_triton.py) and its torch reference on
the same inputs and uniforms for a set of cases (atlas_rl.kernels.testing);
prints one JSON line. Run with TRITON_INTERPRET=1 on a machine without a GPU."""
import json
import sys

import torch

from atlas_rl.kernels.testing import compare_backends, verification_case

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
ragged = [0, 3, 4, 1, 4, 2]  # requests without drafts, with one, with the most
cases = {  # name: (counts, vocab, chunk, logits dtype, p(x) around)
    "multi-chunk": (ragged, 300, 64, torch.float32, 0.5),
    "mostly-rejected": (ragged, 300, 64, torch.float32, 0.15),
    "mostly-accepted": ([2, 2, 2, 2], 300, 32, torch.float32, 0.97),
    "one-chunk": ([2, 1, 3], 50, None, torch.float32, 0.5),
    "bf16-logits": ([3, 3], 300, 128, torch.bfloat16, 0.5),
}
results = {}
seed = 0
for kind in ("one-hot", "sparse", "dense"):
    for name, (counts, vocab, chunk, dtype, accept) in cases.items():
        seed += 1
        case = verification_case(kind, counts, vocab, support=24, device=device, seed=seed,
                                 accept=accept, dtype=dtype)
        if name == "multi-chunk":  # a padded draft token, and a top-k-like -inf cut
            case["draft_token_ids"][2] = -1
            case["target_logits"][:, 100:180] = float("-inf")
        results[f"{kind}/{name}"] = compare_backends(case, chunk=chunk, graphed=True)
print(json.dumps(results))
