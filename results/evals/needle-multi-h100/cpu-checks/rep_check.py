import sys, numpy as np, torch
from transformers import AutoTokenizer, LlamaForCausalLM
from moba_cli.train.data_synth import make_document, chars_estimate
ck = sys.argv[1]
tok = AutoTokenizer.from_pretrained(ck)
m = LlamaForCausalLM.from_pretrained(ck, attn_implementation="sdpa").eval()
first, second = [], []
with torch.no_grad():
    for i in range(20):
        p, a = make_document("repeat", np.random.default_rng([9, i]), 400, lambda ps: [len(tok(x)["input_ids"]) for x in ps])
        text = p + a
        cut = text.index("The same passage again:")
        enc = tok(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        nll = torch.nn.functional.cross_entropy(m(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        head_end = text.index("\n") + 1
        for j, (s, e) in enumerate(enc["offset_mapping"][1:]):
            if s < head_end or (cut - 2 <= s < cut + 25):
                continue
            (first if s < cut else second).append(nll[j].item())
print("first copy nll/token", round(np.mean(first), 3), "second copy", round(np.mean(second), 3))
