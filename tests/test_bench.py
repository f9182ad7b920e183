"""bench.py: the speedrun's budget logic and a tiny end-to-end speedrun."""
import json

import pytest

import bench

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", 
        "--batch_size=64", "--eval_tokens=512", "--num_threads=1", "--iters=2", "--warmup=1"]


def test_budget_iters():
    assert bench.budget_iters(300, 0.5) == 600
    assert bench.budget_iters(300, 0.7) == 428  # whole steps only: 428 * 0.7 = 299.6 <= 300 < 429 * 0.7
    assert bench.budget_iters(0.1, 5.0) == 1  # a step always runs


@pytest.mark.parametrize("argv, msg", [(["--speedrun=-1"], "speedrun"),
                                       (["--speedrun=10", "--race=10"], "separate runs")])
def test_bad_options(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        bench.main(argv)


@pytest.mark.slow
def test_tiny_speedrun_writes_its_record(tmp_path, capsys):
    bench.main(["--speedrun=0.5", f"--out_dir={tmp_path}", "--warmup_iters=10", "--max_iters=100"] + TINY)
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    speed, run = lines
    assert speed["bench"] == "train_throughput" and run["bench"] == "speedrun"
    assert run["planned_iters"] == bench.budget_iters(0.5, speed["s_per_iter"])
    assert run["warmup_iters"] == round(run["planned_iters"] * 10 / 100)  # the recipe's warmup share
    assert run["tokens"] == run["iters"] * 64 * 32 and run["seed"] == 1337
    assert 0 < run["val_bpb"] < 20
    # the run stops once the budget is spent, whatever the plan said: the last step crosses it
    assert 0.5 <= run["step_time_s"] <= run["wall_s"]  # the budget counts steps; wall time adds evaluation
    saved = [json.loads(s) for s in (tmp_path / "speedrun" / "speedrun.jsonl").read_text().splitlines()]
    assert len(saved) == 1 and saved[0]["val_bpb"] == run["val_bpb"] and "--speedrun=0.5" in saved[0]["argv"]
    with pytest.raises(SystemExit, match="previous speedrun"):  # a second run asks before replacing it
        bench.main(["--speedrun=0.5", f"--out_dir={tmp_path}"] + TINY)
