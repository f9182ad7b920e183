"""
bench.py - training throughput of gpt.py's configurations, measured side by side in one run, and
an equal-wall-clock race between the default (Llama-style) config and the nanoGPT-style preset.

    python bench.py                 # tokens/s (and MFU on GPU) as JSON lines, one per configuration
    python bench.py --race=300      # + train both configs for 300 s of compute each, plot val bits/byte

Every line is a JSON object, so results can be collected with `python bench.py | jq`. The throughput
of one configuration is the median over `--iters` timed training steps after `--warmup` untimed ones,
on random windows of the bundled TinyStories. The race gives each config max_iters = budget / (its
measured seconds per step), so both get the same compute time and a complete LR schedule.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import torch

import gpt

try:  # attention_flash.py registers the flash kernel when it exists
    import attention_flash  # noqa: F401
except ImportError:
    pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(cfg: gpt.GPTConfig, tc: gpt.TrainConfig, iters: int, warmup: int) -> dict:
    """Median tokens/s of full training steps (forward, backward, clip, AdamW) of one config."""
    _, _, device = gpt.setup_distributed(tc)
    enc, _ = gpt.build_tokenizer(cfg.vocab_size)
    tokens = gpt.load_tokens("train", enc)
    torch.manual_seed(tc.seed)
    model = gpt.GPT(cfg).to(device)
    opt = gpt.OPTIMIZERS[tc.optimizer](model, tc)
    step_model = torch.compile(model) if tc.compile else model
    gen = torch.Generator().manual_seed(0)
    use_bf16 = device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        off = gpt.batch_offsets(gen, len(tokens), cfg.block_size, tc.batch_size, 1, 1, 0)[0]
        x, y = (t.to(device) for t in gpt.get_batch(tokens, off, cfg.block_size))
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_s = tc.batch_size * cfg.block_size / dt
    out = dict(params=model.num_params(), s_per_iter=round(dt, 4), tokens_per_s=round(tok_s),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               threads=torch.get_num_threads())
    peak = next((v for k, v in gpt.PEAK_FLOPS.items() if k in out["device"]), None)
    if peak:
        flops = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        out["mfu"] = round(flops * tok_s / peak, 4)
    return out


def race(configs: dict[str, gpt.GPTConfig], speeds: dict[str, dict], tc: gpt.TrainConfig,
         budget: float) -> None:
    """Train each config for `budget` seconds of compute and plot val bits/byte vs time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, cfg in configs.items():
        iters = max(10, int(budget / speeds[name]["s_per_iter"]))
        run_tc = dataclasses.replace(tc, max_iters=iters, warmup_iters=max(1, iters // 10),
                                     eval_interval=max(1, iters // 8), out_dir=f"out/race-{name}")
        res = gpt.train(cfg, run_tc)
        f = res["final"]
        print(json.dumps(dict(bench="race", config=name, budget_s=budget, iters=iters,
                              tokens=iters * tc.batch_size * cfg.block_size, params=res["model"].num_params(),
                              val_loss=round(f["val_loss"], 4), val_bpb=round(f["val_bpb"], 4),
                              train_time_s=round(f["train_time"]))), flush=True)
        pts = [(h["time"], h["val_bpb"]) for h in res["history"] if "val_bpb" in h]
        ax.plot(*zip(*pts), "o-", label=f"{name} ({res['model'].num_params() / 1e6:.1f}M params)")
    ax.set_xlabel("wall-clock seconds (training + periodic evaluation)")  # equal *training* time
    ax.set_ylabel("val bits per byte")
    ax.set_title(f"equal compute budget ({budget:.0f} s each), {speeds[name]['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    gpt.ROOT.joinpath("assets").mkdir(exist_ok=True)
    fig.savefig(gpt.ROOT / "assets" / "race.png", dpi=120)


def main(argv: list[str]) -> None:
    opts = dict(iters=10, warmup=3, race=0.0)
    rest = []
    for a in argv:
        key, _, val = a[2:].partition("=")
        if key in opts:
            opts[key] = type(opts[key])(val)
        else:
            rest.append(a)
    base_cfg, tc, _, _ = gpt.parse_args(rest)
    nano_cfg, _, _, _ = gpt.parse_args(rest + ["--preset=nanogpt"])
    configs = {"default": base_cfg, "nanogpt": nano_cfg}
    for impl in sorted(gpt.ATTENTION):
        if impl != base_cfg.attn_impl:
            configs[f"default+{impl}"] = dataclasses.replace(base_cfg, attn_impl=impl)
    speeds = {}
    for name, cfg in configs.items():
        speeds[name] = throughput(cfg, tc, opts["iters"], opts["warmup"])
        row = dict(bench="train_throughput", config=name, attn_impl=cfg.attn_impl, batch_size=tc.batch_size,
                   block_size=cfg.block_size, **speeds[name])
        print(json.dumps(row), flush=True)
    if opts["race"]:
        race({k: configs[k] for k in ("default", "nanogpt")}, speeds, tc, opts["race"])


if __name__ == "__main__":
    main(sys.argv[1:])
