"""Converting one streamed chunk (341 images of 3 x 64 x 64, uint8 -> float32 x / 127.5 - 1, about 16 MB) into a
fresh tensor, as `StoreDataset.chunks` does, against into a reused one: paired rounds, interleaved
(docs/BENCHMARKS.md, the ImageNet-64 `optimal` call).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_convert.py
"""
import torch, numpy as np, time, math, statistics
torch.set_num_threads(2)
raw = np.random.randint(0, 256, (341, 3, 64, 64), dtype=np.uint8)  # one 16 MB float32 chunk of the 64 px store
buf = torch.empty(raw.shape, dtype=torch.float32)
def fresh(raw):
    out = torch.empty(raw.shape, dtype=torch.float32); out.copy_(torch.from_numpy(raw)); out.div_(127.5).sub_(1.0); return out
def reused(raw):
    buf.copy_(torch.from_numpy(raw)); buf.div_(127.5).sub_(1.0); return buf
assert torch.equal(fresh(raw), reused(raw))
T = {"fresh": [], "reused": []}
for r in range(12):
    for f in (fresh, reused):
        t = time.perf_counter()
        for _ in range(50): f(raw)
        T[f.__name__].append((time.perf_counter() - t) / 50 * 1e3)
lr = [math.log(a / b) for a, b in zip(T["fresh"], T["reused"])]
m, se = statistics.mean(lr), statistics.stdev(lr) / math.sqrt(len(lr))
print({k: [round(x, 2) for x in v] for k, v in T.items()})
print("fresh/reused", round(math.exp(m), 2), "95% CI", round(math.exp(m - 2.201 * se), 2), round(math.exp(m + 2.201 * se), 2), "n", len(lr))
