"""How often do held-out answers list the required words ("ball, cat") instead of using them? (docs/grpo.md)

The verifier's gates refuse a bare list of the words, but not a list inside an otherwise finished story
(`"Thank you, ball, cat, cat!"`). This samples the held-out answers exactly as grpo.py's held-out report
does (all 145 valid prompts, temperature 0.7, the same seed), and counts answers in which two required
words are separated only by a comma, among all answers and among the verifier's successes. The start
model (lora.py's full fine-tune) is scored on its best-of-8 samples, each given checkpoint on one answer
per prompt.

    python tools/grpo_word_lists.py out/grpo_C/drgrpo/ckpt.pt
"""

import os
import re
import sys

import torch

sys.path.insert(0, os.getcwd())
import gpt  # noqa: E402
import grpo  # noqa: E402
import lora  # noqa: E402


def lists_words(text: str, words: tuple[str, ...]) -> bool:
    """True if two required words stand next to each other with only a comma between them."""
    ws = {w.lower() for w in words}
    toks = re.findall(r"[a-z']+|,", text.lower())
    return any(a in ws and b == "," and c in ws for a, b, c in zip(toks, toks[1:], toks[2:]))


def main(paths: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = grpo.GRPOConfig(n_eval=145)
    held = lora.load_instructions("valid", cfg.n_eval, seed=cfg.seed + 1)  # as grpo.run_demo
    for path, n in [(str(grpo.start_path(cfg)), 8)] + [(p, 1) for p in paths]:
        model, enc, _ = gpt.load_model(path)
        groups = grpo.sample_groups(model, enc, held, n, cfg.max_new_tokens, cfg.temperature,
                                    torch.Generator().manual_seed(cfg.seed + 1))  # heldout_report's draws
        grpo.score_groups(groups, enc, grpo.REWARDS[cfg.reward], cfg.partial)
        answers = [(t, g["task"].words, s) for g in groups for t, s in zip(g["texts"], g["success"])]
        ok = [a for a in answers if a[2]]
        print(f"{path} ({n} answer{'s' * (n > 1)} per prompt): successes {len(ok)}/{len(answers)}; listing the "
              f"words: {sum(lists_words(t, w) for t, w, _ in ok)} of the successes, "
              f"{sum(lists_words(t, w) for t, w, _ in answers)} of all answers")


if __name__ == "__main__":
    main(sys.argv[1:])
