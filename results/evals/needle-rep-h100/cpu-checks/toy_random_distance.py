"""Plain loop: random ids, a passage copied at a random distance (content-based induction needed)."""
import os, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("THREADS", 1)))
V, B, T = int(os.environ.get("V", 256)), int(os.environ.get("B", 64)), 128
LR = float(os.environ.get("LR", 1e-3)); LAYERS = int(os.environ.get("LAYERS", 2))
cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256)
cfg._attn_implementation = "sdpa"
m = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0)
def batch():
    ids = torch.randint(0, V, (B, T)); mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        P = int(torch.randint(8, 33, ())); rest = T - 2 * P; s = int(torch.randint(0, rest + 1, ()))
        g = s + P + int(torch.randint(0, rest - s + 1, ()))  # second copy start
        ids[b, g:g + P] = ids[b, s:s + P]; mask[b, g + 1:g + P] = True
    return ids, mask
t0 = time.time()
for step in range(1, int(os.environ.get("STEPS", 1500)) + 1):
    ids, mask = batch()
    logits = m(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    loss = nll.mean(); opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0:
        mk = mask[:, 1:]
        print(step, "copy", round(nll[mk].mean().item(), 3), "other", round(nll[~mk].mean().item(), 3), f"{time.time()-t0:.0f}s", flush=True)
