"""Tests for tools/gpu_check.py, the one-call check of kernels.cu on a GPU machine. What can be checked
without a GPU: on a CPU it skips the GPU phases cleanly and still writes its JSON; every command it
would run on the GPU is accepted by gpt.py and bench_kernels.py; the modules on its path import without
the packages a bare GPU machine may lack; its parsers read gpt.py's and pytest's real lines."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

# Not among the GPU machine's packages, or not to be relied on there (tools/gpu_check.py's docstring).
MISSING_THERE = ("gguf", "regex", "matplotlib", "transformers")
BLOCKER = f"""
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_THERE!r}:
            raise ImportError(f"no module named {{name!r}} (blocked: the GPU machine may not have it)")
sys.meta_path.insert(0, Missing())
"""


# -----------------------------------------------------------------------------------------------
# On a CPU: the GPU phases are skipped, the rest runs, the files are what the device tool brings back


@pytest.mark.slow
def test_cpu_mode_skips_gpu_phases_and_writes_json(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run for minutes")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), f"--out={tmp_path}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    phases = res["phases"]
    assert list(phases) == list(gpu_check.PHASES)
    assert phases["env"]["status"] == "ok" and res["env"]["cuda"] is False and res["env"]["torch"]
    # collection imported test_kernels.py and every module it needs
    assert phases["collect"]["status"] == "ok" and phases["collect"]["collected"] > 1000
    for name in gpu_check.PHASES[2:]:
        assert phases[name] == dict(status="skipped", reason="no CUDA GPU"), name
        assert f"no CUDA GPU: skipping {name}" in r.stdout
    assert res["failed"] == []
    # the device tool returns at most 8 files, flat or 2 folders down, named in [A-Za-z0-9._-]
    files = list(tmp_path.rglob("*"))
    assert 0 < len(files) <= 8 and all(f.is_file() and re.fullmatch(r"[\w.-]+", f.name) for f in files)
    assert {f.name for f in files} <= set(gpu_check.Check.FILES)


def test_bad_options_get_one_line_errors(tmp_path):
    for bad in ("--phases=build,bnech", "--budget=0", "--bugdet=5", "--train_iters=0"):
        assert gpu_check.main([bad, f"--out={tmp_path}"]) == 2, bad
    assert not (tmp_path / "results.json").exists()


# -----------------------------------------------------------------------------------------------
# The commands it runs on the GPU: a typo found there costs a whole call


def test_training_commands_parse_and_are_the_documented_models():
    cfgs = {}
    for run in gpu_check.TRAIN_RUNS:
        cmd = gpu_check.train_command(run, 50, "/nonexistent")
        assert cmd[1] == "gpt.py"
        cfg, tc, _, sample = gpt.parse_args(cmd[2:])
        assert not sample and tc.stop_at == 50 < tc.max_iters  # no final evaluation, samples or plot
        assert tc.plot == "" and tc.overwrite and tc.device == "cuda" and tc.dtype == "bfloat16"
        cfgs[run] = cfg
    assert cfgs["train_default"] == gpt.GPTConfig()
    small = cfgs["train_124m"]
    assert (small.n_layer, small.n_head, small.n_embd, small.block_size, small.vocab_size) == (
        12, 12, 768, 1024, 50257)
    with torch.device("meta"):  # GPT-2 small's 124M parameters, without allocating them
        assert round(gpt.GPT(small).num_params() / 1e6) == 124
    # the flash run differs only in the attention, at a head size the CUDA kernel takes
    flash = cfgs["train_124m_flash"]
    assert flash.attn_impl == "flash" and flash.head_size in (64, 128)
    assert gpt.dataclasses.replace(flash, attn_impl=small.attn_impl) == small


def test_bench_commands_parse():
    import bench_kernels
    for cmd in [gpu_check.BENCH] + gpu_check.BENCH_T:
        assert cmd[1] == "bench_kernels.py"
        gpt.config_from_args(bench_kernels.BenchConfig, cmd[2:])


# -----------------------------------------------------------------------------------------------
# Its path needs only what the GPU machine has; its parsers read the real output


@pytest.mark.slow
def test_gpu_path_imports_and_trains_without_optional_packages(tmp_path):
    """Import everything the GPU phases import with gguf, regex, matplotlib and transformers blocked,
    then run the training phase's own command on the CPU (tiny sizes appended: the last flag wins),
    and read its progress lines with the parser the check uses."""
    tiny = ["--device=cpu", "--dtype=float32", "--n_layer=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1",
            "--block_size=32", "--batch_size=8", "--log_interval=2", "--eval_tokens=256"]
    args = gpu_check.train_command("train_default", 4, str(tmp_path / "run"))[2:] + tiny
    code = BLOCKER + f"""
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}, {str(ROOT / "tools")!r}]
import gpt, attention_flash, quant, bench_kernels, test_kernels, gpu_check
gpt.main({args!r})
blocked = sorted(m for m in sys.modules if m.split(".")[0] in {MISSING_THERE!r})
assert not blocked, blocked
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    res = gpu_check.parse_train_log(r.stdout)
    assert [row["iter"] for row in res["progress"]] == [2, 4]
    assert all(row["mfu"] is None for row in res["progress"])  # no MFU without a known GPU's peak
    assert res["tok_s"] == res["progress"][1]["tok_s"] > 0  # the first interval (warm-up) is left out
    assert res["params_m"] > 0 and res["last_loss"] == res["progress"][1]["loss"]


def test_parsers_on_hand_written_lines():
    line = "iter 20/60 | loss 7.1234 | lr 6.00e-04 | 512.3k tok/s | ETA 0m04s | mfu 41.5%"
    rows = gpu_check.parse_train_log(f"model: 124.44M parameters (124.44M trained), ...\n{line}\n")
    assert rows["progress"] == [dict(iter=20, loss=7.1234, tok_s=512300.0, mfu=0.415)]
    assert rows["params_m"] == 124.44 and rows["mfu"] == 0.415
    text = ("tests/test_kernels.py::test_a[1] PASSED\ntests/test_kernels.py::test_b[dtype0-7] FAILED\n"
            "=================== FAILURES ===================\n___ test_b ___\nassert 0.5 < 0.02\n"
            "FAILED tests/test_kernels.py::test_b[dtype0-7] - assert 0.5 < 0.02\n"
            "!!! stopping after 1 failures !!!\n"
            "======= 1 failed, 12 passed, 1 skipped, 1 deselected in 3.21s =======\n")
    res = gpu_check.parse_pytest(text)
    assert (res["failed"], res["passed"], res["skipped"], res["deselected"]) == (1, 12, 1, 1)
    assert res["first_failure"] == "tests/test_kernels.py::test_b[dtype0-7]"
    assert res["failure_text"].startswith("= FAILURES =") and "assert 0.5 < 0.02" in res["failure_text"]
    bench = gpu_check.parse_bench("device: NVIDIA H200\n  ok   attention bf16 x: 1e-03 (tolerance 4e-02)\n"
                                  "| hs=64 | 4 x 32 | 4096 | 300 |\n")
    assert bench["device"] == "device: NVIDIA H200" and len(bench["validation"]) == len(bench["tables"]) == 1


def test_build_falls_back_to_load_only_when_nvcc_reported_no_error(tmp_path, monkeypatch):
    """pip and load() stand-ins: a pip that fails before compiling leads to load(), whose module the
    later phases find through PYTHONPATH; an error in kernels.cu is not compiled a second time."""
    jit = tmp_path / "jit"
    monkeypatch.setattr(gpu_check, "JIT_DIR", str(jit))
    fake_load = f"import os; os.makedirs({str(jit)!r}); open({str(jit / 'llm_kernels.py')!r}, 'w').close()"
    monkeypatch.setattr(gpu_check, "JIT_BUILD", [sys.executable, "-c", fake_load])
    monkeypatch.setattr(gpu_check, "IMPORT_CHECK", [sys.executable, "-c", "import llm_kernels as m; "
                                                    "print('llm_kernels:', m.__file__)"])

    def build(pip_says: str) -> tuple[dict, gpu_check.Check]:
        monkeypatch.setattr(gpu_check, "PIP_BUILD", [sys.executable, "-c", f"print({pip_says!r}); exit(1)"])
        check = gpu_check.Check(gpu_check.CheckConfig(out=str(tmp_path / "out")))
        check.env = dict(cuda=True, capability="9.0")
        return check.build_phase(60), check

    res, check = build("error: invalid command 'bdist_wheel'")
    assert res["status"] == "ok" and res["method"] == "torch.utils.cpp_extension.load", res
    assert res["module"] == str(jit / "llm_kernels.py")
    assert check.extra_env["PYTHONPATH"].split(os.pathsep)[0] == str(jit)
    res, check = build("/x/kernels.cu(12): error: identifier \"foo\" is undefined")
    assert res["status"] == "failed" and res["method"] == "pip" and "load_rc" not in res, res
    assert check.extra_env == {}


def test_a_phase_past_its_timeout_is_killed_with_its_children(tmp_path, monkeypatch):
    """A hung test run: its whole process group is killed (as pip's nvcc would be), the phase is a
    timeout, and tests.log's last started test is named."""
    hang = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            "print('tests/test_kernels.py::test_a PASSED'); print('tests/test_kernels.py::test_b[x] ', "
            "f'child={p.pid}', flush=True); time.sleep(60)")
    monkeypatch.setattr(gpu_check, "TESTS", [sys.executable, "-c", hang])
    check = gpu_check.Check(gpu_check.CheckConfig(out=str(tmp_path)))
    res = check.tests_phase(3)
    assert res["status"] == "timeout" and res["rc"] is None
    assert res["hung_in"] == "tests/test_kernels.py::test_b[x]"
    child = int(re.search(r"child=(\d+)", (tmp_path / "tests.log").read_text())[1])

    def alive() -> bool:  # a zombie (State: Z) has died and only waits for its new parent to reap it
        try:
            return "State:\tZ" not in Path(f"/proc/{child}/status").read_text()
        except FileNotFoundError:
            return False

    for _ in range(100):  # SIGKILL is delivered when the process next runs: give a loaded CPU 10 s
        if not alive():
            break
        time.sleep(0.1)
    assert not alive()


def test_a_phase_needs_only_the_phases_that_were_asked_for(tmp_path, monkeypatch):
    """--phases=tests on a machine that kept its build runs the tests; a failed build blocks them."""
    monkeypatch.setattr(gpu_check, "TESTS", [sys.executable, "-c", "print('1 passed in 0.01s')"])
    for build, runs in (("not in --phases", True), ("failed", False)):
        check = gpu_check.Check(gpu_check.CheckConfig(phases="tests", out=str(tmp_path)))
        check.env = dict(cuda=True)
        check.results["phases"]["build"] = dict(status="skipped" if build == "not in --phases" else build,
                                                reason=build)
        check.phase("tests", 30, check.tests_phase, needs=("build",))
        got = check.results["phases"]["tests"]
        assert (got["status"] == "ok" and got["passed"] == 1) if runs else got == dict(
            status="skipped", reason="build did not succeed"), got
