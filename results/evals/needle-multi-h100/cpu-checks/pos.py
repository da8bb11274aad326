import sys, torch, numpy as np, glob
from transformers import AutoTokenizer, LlamaForCausalLM
ck = sys.argv[1]
tok = AutoTokenizer.from_pretrained(ck)
model = LlamaForCausalLM.from_pretrained(ck, attn_implementation="sdpa").eval()
files = sorted(glob.glob("/root/.pyenv/versions/3.11.7/lib/python3.11/**/*.py", recursive=True))
rng = np.random.default_rng(0)
res = []
with torch.no_grad():
    n = 0
    for f in rng.permutation(files):
        t = open(f, errors="ignore").read()
        ids = tok(t)["input_ids"]
        if len(ids) < 4096:
            continue
        ids = torch.tensor([ids[:4096]])
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        res.append(nll.view(-1)[:4088].view(8, 511).mean(1).numpy())
        n += 1
        if n == 6:
            break
print("loss by 512-token bucket within code files of >=4K tokens:", np.round(np.mean(res, 0), 3))
