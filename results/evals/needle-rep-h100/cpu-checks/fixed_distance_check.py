import sys, numpy as np, torch
from transformers import AutoTokenizer
from moba_cli import load_model
from moba_cli.train.data_synth import make_document
ck = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 400
tok = AutoTokenizer.from_pretrained(ck)
enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
mark = enc("\n\nThe same passage again:\n")
for attn in ["moba", "full", "eager"]:
    m = load_model(ck, attn).eval()
    F, S = [], []
    with torch.no_grad():
        for i in range(10):
            p, a = make_document("repeat", np.random.default_rng([9, i]), n, lambda ps: [len(enc(x)) for x in ps])
            ids = [tok.bos_token_id] + enc(p) + enc(a) + [tok.eos_token_id]
            L = len(mark); j = next(k for k in range(len(ids)) if ids[k:k+L] == mark)
            t = torch.tensor([ids])
            nll = torch.nn.functional.cross_entropy(m(t).logits[0, :-1].float(), t[0, 1:], reduction="none")
            head = len(enc("The passage below is written out twice.\n")) + 1
            F += nll[head+3:j-1].tolist(); S += nll[j+L+3:len(ids)-3].tolist()
    print(attn, "first", round(np.mean(F), 3), "second", round(np.mean(S), 3), flush=True)
