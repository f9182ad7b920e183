"""CPU seconds per optimizer step of a speedrun recipe at one thread (docs/gpt.md, "Record 3").

CPU time (`time.process_time`, page-fault handling included) is disturbed less by other jobs on a
shared machine than wall time, so recipes can be compared while something else runs. Each call times
one recipe with bench.py's throughput (the median of 20 steps after 5, no evaluation).

Run from the repository root; `--keep_freed_memory=0` leaves glibc's allocator at its defaults
(the A/B of record 3's change 1: alternate the two in separate processes):
    python tools/speedrun_step_cost.py --preset=speedrun --n_embd=128 --lr=1.2e-2
    python tools/speedrun_step_cost.py --keep_freed_memory=0 --preset=speedrun --n_embd=128 --lr=1.2e-2
"""

import json
import os
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.getcwd())
import bench  # noqa: E402
import gpt  # noqa: E402


def main(argv: list[str]) -> None:
    keep = "--keep_freed_memory=0" not in argv
    argv = [a for a in argv if a != "--keep_freed_memory=0"]
    if not keep:  # setup_distributed calls it on CPU: make that call a no-op for this process
        gpt.keep_freed_memory = lambda: False
    elif not gpt.keep_freed_memory():
        sys.exit("error: keep_freed_memory had no effect (needs Linux with glibc)")
    cfg, tc, _, _ = gpt.parse_args(argv + ["--num_threads=1"])
    speed = bench.throughput(cfg, tc, iters=20, warmup=5, clock=time.process_time)
    print(json.dumps(dict(flags=argv, keep_freed_memory=keep, params=speed["params"],
                          cpu_s_per_step=speed["s_per_iter"])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
