"""Does the needle-multi checkpoint copy? Loss on a repeated random sequence and on kv_multi lookups."""
import json
import sys

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from moba_cli.train.data_synth import chars_estimate, make_document

ck = sys.argv[1]
tok = AutoTokenizer.from_pretrained(ck)
model = LlamaForCausalLM.from_pretrained(ck, attn_implementation="sdpa").eval()
torch.manual_seed(0)
out = {}
with torch.no_grad():
    x = torch.randint(100, 8000, (1, 256))
    ids = torch.cat([x, x], 1)
    logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    out["repeat_first_half"] = nll[:255].mean().item()
    out["repeat_second_half"] = nll[256:].mean().item()
    rng = np.random.default_rng(1)
    rec_l, look_l, ans_l = [], [], []
    for _ in range(4):
        prompt, answer = make_document("kv_multi", rng, 1500, chars_estimate)
        text = prompt + answer
        enc = tok(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        offs = enc["offset_mapping"]
        logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        mid = text.index("Lookups:")
        # value tokens: characters after "-> " on each line
        for i, (a, b) in enumerate(offs[1:]):
            line_start = text.rfind("\n", 0, a) + 1
            line = text[line_start:text.find("\n", a) if text.find("\n", a) >= 0 else len(text)]
            arrow = text.find("->", line_start)
            if arrow < 0 or a <= arrow + 2 or a > line_start + len(line):
                continue
            (rec_l if a < mid else look_l).append(nll[i].item())
        ans_l.append(nll[-3:].mean().item())
    out["kv_record_value_nll"] = float(np.mean(rec_l))
    out["kv_lookup_value_nll"] = float(np.mean(look_l))
    out["kv_last_answer_nll"] = float(np.mean(ans_l))
print(json.dumps(out, indent=1))
