"""First vs second copy nll on new-layout repeat docs of lengths not trained on (sdpa)."""
import sys, numpy as np, torch
from transformers import AutoTokenizer
from moba_cli import load_model
from moba_cli.train.data_synth import make_document
ck = sys.argv[1]; lengths = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "300,400,512").split(",")]
tok = AutoTokenizer.from_pretrained(ck)
enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
m = load_model(ck, "full").eval()
for n in lengths:
    F, S = [], []
    for i in range(12):
        p, a = make_document("repeat", np.random.default_rng([9, n, i]), n, lambda ps: [len(enc(x)) for x in ps])
        pre, rest = p.split("\n\nPassage:\n", 1)
        passage, rest = rest.split("\nEnd of passage.\n", 1)
        gap, second = rest.split("\n\nThe same passage again:\n", 1)
        a_ids = [tok.bos_token_id] + enc(pre + "\n\nPassage:\n")
        p_ids = enc(passage)
        b_ids = enc("\nEnd of passage.\n" + gap + "\n\nThe same passage again:\n")
        s_ids = enc(second) + enc(a)
        ids = a_ids + p_ids + b_ids + s_ids
        t = torch.tensor([ids])
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(m(t).logits[0, :-1].float(), t[0, 1:], reduction="none")
        f0 = len(a_ids); s0 = len(a_ids) + len(p_ids) + len(b_ids)
        F += nll[f0 + 2 - 1:f0 + len(p_ids) - 1].tolist(); S += nll[s0 + 2 - 1:s0 + len(s_ids) - 1].tolist()
    print(ck.split("/")[-1], n, "first", round(np.mean(F), 3), "second", round(np.mean(S), 3), flush=True)
