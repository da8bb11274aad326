import sys, numpy as np, torch
from transformers import AutoTokenizer
from moba_cli import load_model
ck, data = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(ck)
enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
mark = enc("\n\nThe same passage again:\n")
toks = np.fromfile(f"{data}/val.tokens", dtype=np.uint16); docs = np.load(f"{data}/val.docs.npy")
print(docs[:3], docs.shape, toks.shape)
m = load_model(ck, "full").eval()
F, S = [], []
for d in range(min(30, len(docs))):
    s, e = (int(docs[d][0]), int(docs[d][1])) if docs.ndim == 2 else (int(docs[d]), int(docs[d+1]))
    ids = toks[s:e].astype(np.int64).tolist()
    L = len(mark); j = next((k for k in range(len(ids)) if ids[k:k+L] == mark), None)
    if j is None: continue
    t = torch.tensor([ids])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(m(t).logits[0, :-1].float(), t[0, 1:], reduction="none")
    F += nll[12:j-1].tolist(); S += nll[j+L+3:len(ids)-3].tolist()
    if d < 3: print(tok.decode(ids)[:300].replace("\n","|"))
print("first", round(np.mean(F), 3), "second", round(np.mean(S), 3), len(F), len(S))
