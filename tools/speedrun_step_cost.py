"""CPU seconds per optimizer step of a speedrun recipe at one thread (docs/gpt.md, "Record 3").

CPU time (`time.process_time`, page-fault handling included) is disturbed less by other jobs on a
shared machine than wall time, so recipes can be compared while something else runs. Each call times
one recipe: the median of 20 steps after 5, gpt.py's model, optimizer and batches, no evaluation.

Run from the repository root; `--keep_freed_memory=0` leaves glibc's allocator at its defaults
(the A/B of record 3's change 1: alternate the two in separate processes):
    python tools/speedrun_step_cost.py --preset=speedrun --n_embd=128 --lr=1.2e-2
    python tools/speedrun_step_cost.py --keep_freed_memory=0 --preset=speedrun --n_embd=128 --lr=1.2e-2
"""

import json
import os
import statistics
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402

import gpt  # noqa: E402
import muon  # noqa: E402, F401  (registers --optimizer=muon)


def main(argv: list[str]) -> None:
    keep = "--keep_freed_memory=0" not in argv
    argv = [a for a in argv if a != "--keep_freed_memory=0"]
    torch.set_num_threads(1)
    if keep and not gpt.keep_freed_memory():
        sys.exit("error: keep_freed_memory had no effect (needs Linux with glibc)")
    cfg, tc, _, _ = gpt.parse_args(argv)
    enc, _ = gpt.build_tokenizer(cfg.vocab_size)
    tokens = gpt.load_tokens("train", enc)
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    opt = gpt.plugin("optimizer", tc.optimizer)(model, tc)
    gen = torch.Generator().manual_seed(0)
    cpu, wall = [], []
    for i in range(25):
        offsets = gpt.batch_offsets(gen, len(tokens), cfg.block_size, tc.batch_size, tc.grad_accum, 1, 0)
        batches = [gpt.get_batch(tokens, o, cfg.block_size) for o in offsets]
        c0, w0 = time.process_time(), time.perf_counter()
        for x, y in batches:
            _, loss = model(x, y)
            (loss / tc.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 5:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    print(json.dumps(dict(flags=argv, keep_freed_memory=keep, params=model.num_params(),
                          cpu_s_per_step=round(statistics.median(cpu), 4),
                          wall_s_per_step=round(statistics.median(wall), 4))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
