"""Does a tiny transformers Llama learn induction on repeated random sequences (plain loop, CPU)?"""
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
import os
V, L, B = int(os.environ.get("V", 64)), int(os.environ.get("L", 32)), int(os.environ.get("B", 64))
cfg = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, rope_theta=float(sys.argv[1]) if len(sys.argv) > 1 else 10000.0)
cfg._attn_implementation = "sdpa"
m = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
t0 = time.time()
for step in range(1, int(os.environ.get("STEPS", 1500)) + 1):
    x = torch.randint(0, V, (B, L))
    ids = torch.cat([x, x], 1)
    logits = m(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    loss = nll.mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % int(os.environ.get("EVERY", 150)) == 0:
        print(step, "first half", round(nll[:, :L - 1].mean().item(), 3), "second half", round(nll[:, L:].mean().item(), 3),
              f"{time.time() - t0:.0f}s", flush=True)
