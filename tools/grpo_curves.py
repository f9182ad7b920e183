"""Reward, KL and answer-length curves of grpo.py runs drawn from their printed logs (docs/grpo.md).

A run's results.json holds its history only once the method has finished; this reads the lines every
step prints instead, so it also draws runs that were stopped early. Each argument is LABEL=LOG, the log
being what `python grpo.py ... > LOG` printed (one RL method per log); the held-out measurements of
`--eval_every` become the dots of the reward panel, as in grpo.py's own plot.

    python tools/grpo_curves.py --out=assets/grpo_curves_145.png "grpo=grpo.log" "drgrpo, beta 0=drgrpo.log"
"""

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())
import grpo  # noqa: E402

STEP = re.compile(r" step (\d+)/\d+: reward ([\d.]+) success ([\d.]+) kl ([\d.]+) length (\d+)")
HELD = re.compile(r" held-out at step (\d+): success ([\d.]+), .*val_loss ([\d.]+)")


def parse_log(text: str) -> list[dict]:
    """The history entries (step, reward, success, kl, length; heldout success and val loss where
    measured) of the one RL method in a grpo.py log."""
    hist: list[dict] = []
    for line in text.splitlines():
        if m := STEP.search(line):
            hist.append(dict(step=int(m[1]), reward=float(m[2]), success=float(m[3]), kl=float(m[4]),
                             length=float(m[5])))
        elif (m := HELD.search(line)) and hist and hist[-1]["step"] == int(m[1]):
            hist[-1]["heldout"] = dict(success=float(m[2]), val_loss=float(m[3]))
    if not hist:
        raise ValueError("no grpo.py step lines in this log")
    return hist


def main(argv: list[str]) -> None:
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "")
    runs = dict(a.split("=", 1) for a in argv if not a.startswith("--out="))
    if not out or not runs or any(not v for v in runs.values()):
        sys.exit(__doc__)
    hists = {}
    for label, log in runs.items():
        try:
            hists[label] = parse_log(Path(log).read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {log}: {e}")
        print(f"{label}: {len(hists[label])} steps, held-out "
              + ", ".join(f"step {h['step']} {h['heldout']['success']:.3f}" for h in hists[label] if "heldout" in h))
    grpo.plot_curves(hists, Path(out), "grpo.py: 16 prompts x 8 answers per step, lr 3e-4, 145 held-out prompts")
    print(f"plot: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
