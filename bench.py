"""
bench.py - training throughput of gpt.py's configurations, measured side by side in one run, and
an equal-wall-clock race between the default (Llama-style) config and the nanoGPT-style preset.

Run it
    python bench.py                 # tokens/s (and MFU on GPU) as JSON lines, one per configuration
    python bench.py --race=300      # + train both configs for 300 s of compute each, plot val bits/byte
    python bench.py --n_layer=8 --batch_size=16   # any gpt.py flag changes the benchmarked model

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
from dataclasses import dataclass
from pathlib import Path

import torch

import gpt

@dataclass
class BenchOptions:
    """bench.py's own flags; every other flag is gpt.py's (model and training configuration)."""

    iters: int = 10  # timed training steps per configuration (the median is reported)
    warmup: int = 3  # untimed steps before them
    race: float = 0.0  # seconds of training compute per config in the race; 0 = no race

    def __post_init__(self):
        if self.iters < 1 or self.warmup < 0 or self.race < 0:
            raise ValueError("iters must be >= 1, warmup and race >= 0")


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
         budget: float, plot: Path) -> None:
    """Train each config for `budget` seconds of compute and plot val bits/byte vs time."""
    fig, ax = gpt.pyplot().subplots(figsize=(6.5, 4))
    for name, cfg in configs.items():
        iters = max(10, int(budget / speeds[name]["s_per_iter"]))
        run_tc = dataclasses.replace(tc, max_iters=iters, warmup_iters=max(1, iters // 10),
                                     eval_interval=max(1, iters // 8), out_dir=f"{tc.out_dir}/race-{name}",
                                     ckpt="", overwrite=True)
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
    gpt.save_figure(fig, plot)
    print(f"plot: {plot}")


def main(argv: list[str]) -> None:
    if gpt.wants_help(argv):
        print(gpt.help_text("bench.py", [("bench", BenchOptions), ("model", gpt.GPTConfig),
                                         ("training", gpt.TrainConfig)], __doc__))
        return
    ours = {f.name for f in dataclasses.fields(BenchOptions)}
    mine = [a for a in argv if a.startswith("--") and a[2:].partition("=")[0] in ours]
    rest = [a for a in argv if a not in mine]
    try:
        opts = gpt.config_from_args(BenchOptions, mine)
        base_cfg, tc, _, _ = gpt.parse_args(rest)
        nano_cfg, _, _, _ = gpt.parse_args(rest + ["--preset=nanogpt"])
    except ValueError as e:
        sys.exit(f"error: {e}")
    configs = {"default": base_cfg, "nanogpt": nano_cfg}
    for impl in sorted(set(gpt.ATTENTION) | set(gpt.PROVIDERS["attn_impl"])):  # every attention kernel
        if impl != base_cfg.attn_impl:
            configs[f"default+{impl}"] = dataclasses.replace(base_cfg, attn_impl=impl)
    speeds = {}
    for name, cfg in configs.items():
        speeds[name] = throughput(cfg, tc, opts.iters, opts.warmup)
        row = dict(bench="train_throughput", config=name, attn_impl=cfg.attn_impl, batch_size=tc.batch_size,
                   block_size=cfg.block_size, **speeds[name])
        print(json.dumps(row), flush=True)
    if opts.race:
        documented = opts == BenchOptions(race=180) and gpt.is_default(base_cfg) and \
            gpt.is_default(tc, gpt.RUN_ONLY_FIELDS)
        plot = gpt.plot_path("race.png", documented, tc.out_dir, tc.plot)
        race({k: configs[k] for k in ("default", "nanogpt")}, speeds, tc, opts.race, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
