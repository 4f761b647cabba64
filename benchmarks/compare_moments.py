"""Paired, interleaved timings in one process, on a store: `SoftmaxState.moments` as it was (3-D `matmul`) and
as it is (2-D products) for `optimal`'s and `scfdm`'s closed-form fields, and `scfdm`'s closed form against
autograd (docs/BENCHMARKS.md, the CIFAR-sized study).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare_moments.py /work/bigdata/cifar-grf.ldstore 5
"""
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from localdiff import make_denoiser
from localdiff.data import load_dataset
from localdiff.sensitivity import sensitivity_fields
from localdiff.denoisers.stream import softmax as S
new_moments = S.SoftmaxState.moments.__func__
def old_moments(cls, logits, y, index):
    m = logits.amax(dim=-1)
    e = cls.exp(logits - m.unsqueeze(-1))
    return cls(m, e.sum(dim=-1), e @ y, (e * y[:, index].T) @ y)
STORE = sys.argv[1]
data = load_dataset(STORE)
test = load_dataset(STORE, split="test")
dens = {"optimal": make_denoiser("optimal", data), "scfdm": make_denoiser("scfdm", data)}
def run(model, method, moments):
    S.SoftmaxState.moments = classmethod(moments)
    t = time.perf_counter()
    f = sensitivity_fields(dens[model], test, "center", [500], 8, 0, method=method, progress=False)
    return time.perf_counter() - t, f.mean
cases = {"optimal closed, old moments": ("optimal", "closed", old_moments), "optimal closed, new moments": ("optimal", "closed", new_moments),
         "scfdm closed, old moments": ("scfdm", "closed", old_moments), "scfdm closed, new moments": ("scfdm", "closed", new_moments),
         "scfdm autograd": ("scfdm", "autograd", new_moments)}
R = int(sys.argv[2]) if len(sys.argv) > 2 else 5
times = {k: [] for k in cases}
for r in range(R):
    for k, c in cases.items():
        s, _ = run(*c); times[k].append(s)
    print(r, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired(a, b):
    lr = [math.log(x / y) for x, y in zip(times[a], times[b])]
    m, sd = statistics.mean(lr), statistics.stdev(lr)
    tq = T975.get(len(lr) - 1, 2.0)  # Student t, 97.5% quantile
    return {"ratio": round(math.exp(m), 3), "ci95": [round(math.exp(m - tq * sd / math.sqrt(len(lr))), 3), round(math.exp(m + tq * sd / math.sqrt(len(lr))), 3)], "n": len(lr)}
out = {"times_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
       "old/new optimal": paired("optimal closed, old moments", "optimal closed, new moments"),
       "old/new scfdm closed": paired("scfdm closed, old moments", "scfdm closed, new moments"),
       "scfdm closed(new)/autograd": paired("scfdm closed, new moments", "scfdm autograd")}
print(json.dumps(out, indent=1))
