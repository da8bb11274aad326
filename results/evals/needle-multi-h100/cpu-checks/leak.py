"""Packed training-path loss (moba attention, position_ids restart per document) against each document
scored alone with sdpa, on validation documents of the needle-multi data."""
import sys
import numpy as np
import torch
from transformers import LlamaForCausalLM
from moba_cli.integrations.attention import register
from moba_cli.train.data import TokenDataset

register()
ck = sys.argv[1]
ds = TokenDataset(sys.argv[2], "val")
m_moba = LlamaForCausalLM.from_pretrained(ck).eval()
m_sdpa = LlamaForCausalLM.from_pretrained(ck, attn_implementation="sdpa").eval()
docs = [ds.doc(i) for i in range(ds.n_docs)]
rng = np.random.default_rng(0)
sel = [d for d in docs if 300 <= len(d) <= 1500][:6]
ids = np.concatenate(sel)
pos = np.concatenate([np.arange(len(d)) for d in sel])
x = torch.tensor(ids[None].astype(np.int64))
p = torch.tensor(pos[None])
with torch.no_grad():
    for name, m in (("moba", m_moba), ("sdpa", m_sdpa)):
        lg = m(input_ids=x, position_ids=p).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(lg, x[0, 1:], reduction="none")
        keep = torch.tensor(pos[1:] != 0)
        print(name, "packed:", round(nll[keep].mean().item(), 4))
    tot, n = 0.0, 0
    for d in sel:
        xd = torch.tensor(d[None].astype(np.int64))
        lg = m_sdpa(input_ids=xd).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(lg, xd[0, 1:], reduction="none")
        tot += nll.sum().item(); n += nll.numel()
    print("sdpa per document:", round(tot / n, 4), "docs", [len(d) for d in sel])
