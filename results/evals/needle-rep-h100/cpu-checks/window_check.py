"""Does a checkpoint use its context? Next-token loss at positions 1024-1087 of source files with the whole
context against only the last W tokens (bos kept), full attention."""
import glob, sys, torch
from transformers import AutoTokenizer
from moba_cli import load_model
ck = sys.argv[1]
tok = AutoTokenizer.from_pretrained(ck)
m = load_model(ck, "full").eval()
files = sorted(glob.glob("/work/main/moba_cli/**/*.py", recursive=True))
res = {"full": [], 16: [], 64: [], 256: []}
n = 0
with torch.no_grad():
    for f in files:
        ids = tok(open(f).read())["input_ids"]
        if len(ids) < 1200:
            continue
        n += 1
        ids = ids[:1100]
        t = torch.tensor([ids])
        full = torch.nn.functional.cross_entropy(m(t).logits[0, :-1].float(), t[0, 1:], reduction="none")
        res["full"] += full[1024:1088].tolist()
        for W in (16, 64, 256):
            ctx = torch.stack([torch.tensor([ids[0]] + ids[p - W + 1:p + 1]) for p in range(1024, 1088)])
            lg = m(ctx).logits[:, -1].float()
            res[W] += torch.nn.functional.cross_entropy(lg, torch.tensor(ids[1025:1089]), reduction="none").tolist()
        if n == 8:
            break
print(ck, n, "files:", {k: round(sum(v) / len(v), 3) for k, v in res.items()})
