"""
bench.py - training throughput of gpt.py's configurations, measured side by side in one run, an
equal-wall-clock race between the default (Llama-style) config and the nanoGPT-style preset, and the
speedrun: the best model a fixed budget of training time can buy (records in docs/gpt.md).

Run it
    python bench.py                 # tokens/s (and MFU on GPU) as JSON lines, one per configuration
    python bench.py --race=300      # + train both configs for 300 s of compute each, plot val bits/byte
    python bench.py --n_layer=8 --batch_size=16   # any gpt.py flag changes the benchmarked model
    python bench.py --speedrun=300  # one recipe (gpt.py's flags) for 300 s of training-step time

Every line is a JSON object, so results can be collected with `python bench.py | jq`. The throughput
of one configuration is the median over `--iters` timed training steps after `--warmup` untimed ones,
on random windows of the bundled TinyStories. The race gives each config max_iters = budget / (its
measured seconds per step), so both get the same compute time and a complete LR schedule.

The speedrun trains one recipe for `budget` seconds of optimizer-step time (gpt.py's --time_budget):
the LR schedule is placed by the share of the budget spent, and the run stops when it is spent, so the
step count is whatever the machine delivers. The recipe's seconds per step are measured first only to
scale the schedule (max_iters = budget / (s per step), warmup keeps its share of it). The model is
scored on the *whole* validation split in bits per byte, which compares across tokenizers and model
sizes. Evaluation is not counted in the budget. A loaded machine trains fewer steps: compare records
made on one quiet machine.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import gpt

@dataclass
class BenchOptions:
    """bench.py's own flags; every other flag is gpt.py's (model and training configuration)."""

    iters: int = 10  # timed training steps per configuration (the median is reported)
    warmup: int = 3  # untimed steps before them
    race: float = 0.0  # seconds of training compute per config in the race; 0 = no race
    speedrun: float = 0.0  # seconds of training-step time for one recipe (gpt.py's flags); 0 = off

    def __post_init__(self):
        if self.iters < 1 or self.warmup < 0 or self.race < 0 or self.speedrun < 0:
            raise ValueError("iters must be >= 1; warmup, race and speedrun >= 0")
        if self.race and self.speedrun:
            raise ValueError("--race and --speedrun are separate runs: give one of them")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(cfg: gpt.GPTConfig, tc: gpt.TrainConfig, iters: int, warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median seconds and tokens/s of full optimizer steps (grad_accum forward/backward passes, clip,
    the optimizer) of one config, with gpt.train's threads, dtype and optimizer. `clock` = wall time;
    time.process_time gives CPU seconds, which other jobs on a shared machine disturb less."""
    _, _, device = gpt.setup_distributed(tc)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    enc, _ = gpt.build_tokenizer(cfg.vocab_size)
    tokens = gpt.load_tokens("train", enc)
    torch.manual_seed(tc.seed)
    model = gpt.GPT(cfg).to(device)
    opt = gpt.plugin("optimizer", tc.optimizer)(model, tc)
    step_model = torch.compile(model) if tc.compile else model
    gen = torch.Generator().manual_seed(0)
    use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
    times = []
    for i in range(warmup + iters):
        offs = gpt.batch_offsets(gen, len(tokens), cfg.block_size, tc.batch_size, tc.grad_accum, 1, 0)
        batches = [[t.to(device) for t in gpt.get_batch(tokens, o, cfg.block_size)] for o in offs]
        sync(device)
        t0 = clock()
        for x, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                _, loss = step_model(x, y)
            (loss / tc.grad_accum).backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(clock() - t0)
    dt = statistics.median(times)
    tok_s = tc.batch_size * tc.grad_accum * cfg.block_size / dt
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


def budget_iters(budget: float, s_per_iter: float) -> int:
    """The steps that fit in `budget` seconds of training at `s_per_iter` (at least one)."""
    return max(1, int(budget / s_per_iter))


def speedrun(cfg: gpt.GPTConfig, speed: dict, tc: gpt.TrainConfig, budget: float, argv: list[str]) -> dict:
    """Train one recipe for `budget` seconds of optimizer-step time; score it on the whole val split.
    The measured s/step only plans the schedule's scale (`planned_iters`); the run stops when the
    budget is spent. Prints a JSON line (also appended, with the command line `argv`, to
    out_dir/speedrun/speedrun.jsonl) and a few samples."""
    planned = budget_iters(budget, speed["s_per_iter"])
    warmup = round(planned * tc.warmup_iters / tc.max_iters)  # the recipe's warmup share of its schedule
    run_tc = dataclasses.replace(tc, max_iters=planned, warmup_iters=warmup, stop_at=0, time_budget=budget,
                                 eval_interval=max(1, planned // 8), ckpt_interval=planned,
                                 log_interval=max(1, planned // 10), out_dir=f"{tc.out_dir}/speedrun")
    res = gpt.train(cfg, run_tc)
    f = res["final"]
    iters = f["iters"]
    row = dict(bench="speedrun", budget_s=budget, s_per_iter=speed["s_per_iter"], planned_iters=planned,
               iters=iters, warmup_iters=warmup,
               tokens=iters * tc.batch_size * tc.grad_accum * cfg.block_size,
               seed=tc.seed, params=res["model"].num_params(), threads=speed["threads"],
               val_loss=round(f["val_loss"], 4), val_bpb=round(f["val_bpb"], 4),
               step_time_s=round(f["step_time"], 1), wall_s=round(f["train_time"], 1), device=speed["device"])
    print(json.dumps(row), flush=True)
    with open(Path(run_tc.out_dir) / "speedrun.jsonl", "a") as fh:
        fh.write(json.dumps(dict(row, argv=argv)) + "\n")
    enc, _ = gpt.build_tokenizer(cfg.vocab_size)
    gpt.print_samples(res["model"], enc, gpt.SampleConfig(num_samples=2))
    return row


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
    if opts.speedrun:  # one recipe: time it, then train it for the budget
        last = Path(tc.out_dir) / "speedrun" / "ckpt.pt"
        if last.exists() and not tc.overwrite:  # say so now, not after the timing
            sys.exit(f"error: {last} holds the previous speedrun's model (its record is in speedrun.jsonl "
                     "beside it): add --overwrite=True to replace it, or give another --out_dir")
        speed = throughput(base_cfg, tc, opts.iters, opts.warmup)
        print(json.dumps(dict(bench="train_throughput", config="speedrun", **speed)), flush=True)
        speedrun(base_cfg, speed, tc, opts.speedrun, argv)
        return
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
