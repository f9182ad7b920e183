"""
tools/gpu_check.py - everything kernels.cu needs checked on a GPU, in one call of a bare machine:
build the llm_kernels extension, run its tests, benchmark it, and time gpt.py's bf16 training.

A GPU may be lent for minutes, once. So one command does it all: each phase runs under a timeout cut
from one overall budget (default 480 s), a phase that fails is recorded and the next one still runs,
and results.json is rewritten after every phase, so a run that is killed keeps what it measured. The
machine is bare (CUDA, nvcc, PyTorch, tiktoken, pytest, hypothesis; nothing can be downloaded), so
nothing on these phases' path may need another package: tests/test_gpu_check.py checks that on a CPU.

Phases, most important first (when the budget runs short, the last ones are skipped):
  env               versions of Python, torch, CUDA, nvcc and the packages the phases use; the GPU
  collect           pytest --collect-only tests/test_kernels.py: its imports work; how many tests
  build             pip install -e . for this GPU's architecture only (see BUILD below)
  tests             pytest -x tests/test_kernels.py: stops at the first failure and prints it
  bench             python bench_kernels.py: validate, then time vs SDPA-flash and cuBLAS fp16 (T=4096)
  train_default     python gpt.py's default model, bf16, a few dozen steps: tokens/s and MFU
  train_124m        GPT-2 small's shape (12 layers, C=768, 12 heads, T=1024, V=50257): tokens/s, MFU
  bench_T           bench_kernels.py at T=1024 and T=16384; quantized matmul at M = 64..2048
  train_124m_flash  train_124m with --attn_impl=flash, i.e. the llm_kernels attention
env and collect also run on a CPU; without a CUDA GPU every other phase prints "no CUDA GPU: skipping
<phase>" and results.json is still written.

Run it
    python3 tools/gpu_check.py                           # all phases; files in $OUT, else out/gpu_check/
    python3 tools/gpu_check.py --phases=build,tests      # only these
    python3 tools/gpu_check.py --budget=300 --train_iters=30
Files (flat, at most 6): gpu_check.log (this script's output), results.json, build.log, tests.log,
bench.log, train.log. Exit code: 0 when no phase failed (a skipped phase is not a failure), else 1.

Not covered: torch.compile'd training (its compile time does not fit the budget), several GPUs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpt  # noqa: E402  (only for the repo's --key=value command line)

PY = sys.executable  # "python3" on the GPU machine; plain "python" may not exist there


PHASES = ("env", "collect", "build", "tests", "bench", "train_default", "train_124m", "bench_T",
          "train_124m_flash")


@dataclass
class CheckConfig:
    phases: str = "all"  # comma-separated phase names (env always runs; one left out blocks nothing), or all
    budget: float = 480.0  # seconds for the whole check; each phase's timeout is cut from what is left
    out: str = ""  # folder for the logs and results.json; "" = $OUT when set, else out/gpu_check
    train_iters: int = 50  # optimizer steps of each training run (a progress line every 10)


# -----------------------------------------------------------------------------------------------
# What each phase runs. Commands are lists built here, so tests/test_gpu_check.py can check on a CPU
# that gpt.py and bench_kernels.py accept every flag: a typo found on the GPU costs a whole call.

# BUILD. `pip install -e . --no-build-isolation` or torch.utils.cpp_extension.load: both run the same
# one nvcc on kernels.cu, and that compile is nearly all of the time. Measured on the 2-core CPU
# machine (nvcc 13.0, sm_90 only, torch 2.13's headers), with the real build's host flags -O3
# -lineinfo: 120 s of CPU time, of which 67 s are the C++ front end (606 s of wall time under a load
# of 12). nvcc runs one file for one architecture as one chain of single-threaded steps, so the GPU
# host's 16 cores do not help: expect ~2 minutes there; the phase may take 300 s. pip adds ~2 s of
# CPU of its own (an LLM_KERNELS=0 install), load() nothing, so the two are equally fast; pip wins on
# the rest: it is the documented install (docs/kernels.md), so setup.py gets checked too, and
# `import llm_kernels` then works in every later process, where load()'s module would have to be
# found through PYTHONPATH. --no-deps: setup.py's install_requires name matplotlib, which the machine
# may lack and cannot download; --no-index: pip never reaches for the network. TORCH_CUDA_ARCH_LIST
# = this GPU's own capability (9.0 on an H100/H200): setup.py's default "8.0;9.0+PTX" would compile
# the device code twice and embed PTX. Torch 2.11 builds extensions as C++17 (C++20 from 2.12 on);
# kernels.cu passes nvcc's C++17 front end too. If pip fails before nvcc reported an error in
# kernels.cu (no setuptools with bdist_wheel, a system Python that refuses pip), load() is the fallback.
PIP_BUILD = [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-v", "-e", "."]
JIT_DIR = "build/llm_kernels_jit"
JIT_BUILD = [PY, "-c", "import os, torch.utils.cpp_extension as c; os.makedirs(%r, exist_ok=True); "
             "c.load('llm_kernels', ['kernels.cu'], extra_cuda_cflags=['-O3', '-lineinfo'], "
             "build_directory=%r, verbose=True)" % (JIT_DIR, JIT_DIR)]
IMPORT_CHECK = [PY, "-c", "import torch, llm_kernels; print('llm_kernels:', llm_kernels.__file__)"]

# The CI compile test is left out: the build phase has just compiled the same file with the same nvcc
# (its warnings are counted from build.log). -v names each test as it starts, so a kernel that hangs
# until the timeout still names its test in tests.log.
COMPILE_TEST = "tests/test_kernels.py::test_kernels_cu_compiles_with_nvcc"
PYTEST = [PY, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_kernels.py"]
TESTS = PYTEST + ["-x", "-v", "--durations=10", f"--deselect={COMPILE_TEST}"]
COLLECT = PYTEST + ["--collect-only", "-q"]

BENCH = [PY, "bench_kernels.py"]
# The other sequence lengths; with them the quantized matmul at prefill sizes (M > 8: the tiled GEMM).
BENCH_T = [BENCH + ["--T=1024", "--quant_m=64,512,2048"],
           BENCH + ["--T=16384", "--quant_shapes=4096x4096", "--quant_m=1"]]

# Training: stop_at < max_iters ends the run before the final whole-split evaluation, the samples
# and the plot (which would need matplotlib); --plot= turns the plot off in any case. One evaluation
# runs at iteration 0, outside the tokens/s figures. The checkpoint written at the stop goes to a
# temporary folder that is deleted afterwards (1.5 GB for the 124M model with its AdamW moments).
GPT2_SMALL = ["--preset=nanogpt", "--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024",
              "--vocab_size=50257", "--batch_size=32", "--lr=6e-4"]
TRAIN_RUNS = {"train_default": [], "train_124m": GPT2_SMALL,
              "train_124m_flash": GPT2_SMALL + ["--attn_impl=flash"]}


def train_command(run: str, iters: int, out_dir: str) -> list[str]:
    return [PY, "gpt.py", *TRAIN_RUNS[run], f"--max_iters={iters + 10}", f"--stop_at={iters}",
            "--warmup_iters=10", "--log_interval=10", "--eval_tokens=8192", "--device=cuda",
            "--dtype=bfloat16", "--plot=", "--overwrite", f"--out_dir={out_dir}"]


# -----------------------------------------------------------------------------------------------
# Reading the logs


PROGRESS = re.compile(r"^iter (\d+)/\d+ \| loss ([\d.]+) \|.*?\| ([\d.]+)k tok/s(?:.*?\| mfu ([\d.]+)%)?")


def parse_train_log(text: str) -> dict:
    """gpt.py's progress lines -> tokens/s and MFU. The first interval holds CUDA's warm-up, so the
    medians leave it out when there are later ones."""
    rows = []
    for line in text.splitlines():
        m = PROGRESS.match(line.strip())
        if m:
            rows.append(dict(iter=int(m[1]), loss=float(m[2]), tok_s=round(float(m[3]) * 1e3),
                             mfu=float(m[4]) / 100 if m[4] else None))
    out: dict = dict(progress=rows)
    m = re.search(r"model: ([\d.]+)M parameters", text)
    out["params_m"] = float(m[1]) if m else None
    m = re.search(r"attention_flash: (.*)", text)
    out["attention_path"] = m[1].strip() if m else None
    steady = rows[1:] if len(rows) > 1 else rows
    if steady:
        out["tok_s"] = statistics.median(r["tok_s"] for r in steady)
        mfus = [r["mfu"] for r in steady if r["mfu"] is not None]
        out["mfu"] = statistics.median(mfus) if mfus else None
        out["last_loss"] = rows[-1]["loss"]
    return out


def parse_pytest(text: str) -> dict:
    """Counts from pytest's closing line, the first failing test, and its FAILURES section."""
    out: dict = {}
    closing = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    if closing:
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                  closing[-1]):
            out[word.rstrip("s") if word.startswith("error") else word] = int(n)
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    out["first_failure"] = m[1] if m else None
    m = re.search(r"(\d+) tests? collected", text)
    if m:
        out["collected"] = int(m[1])
    i = text.find("= FAILURES =")
    if i < 0:
        i = text.find("= ERRORS =")
    if i >= 0:
        out["failure_text"] = "\n".join(text[i:].splitlines()[:150])
    return out


def parse_bench(text: str) -> dict:
    """bench_kernels.py's validation lines and its markdown tables, as printed."""
    return dict(device=next((ln for ln in text.splitlines() if ln.startswith("device:")), None),
                validation=[ln.strip() for ln in text.splitlines() if re.match(r"\s+(ok  |FAIL) ", ln)],
                tables=[ln for ln in text.splitlines() if ln.startswith("|")])


# nvcc's front end writes "kernels.cu(123): error: ...", gcc "kernels.cu:123:4: error: ...".
NVCC_ERROR = re.compile(r"kernels\.cu(\(\d+\)|:\d+:\d+): (fatal )?error|ptxas (fatal|error)")


def kernel_warnings(build_log: str) -> list[str]:
    return [ln.strip() for ln in build_log.splitlines()
            if "kernels.cu" in ln and re.search("warning", ln, re.I)]


# -----------------------------------------------------------------------------------------------
# Running commands: each in its own process group, killed whole at its timeout (pip -> nvcc -> cicc).


@dataclass
class Ran:
    rc: Optional[int]  # None: killed at the timeout
    seconds: float
    text: str  # what it printed (also appended to its log)


def run(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None) -> Ran:
    with open(log, "a") as f:
        f.write(f"\n=== {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                             start_new_session=True)
        try:
            rc: Optional[int] = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
        seconds = time.perf_counter() - t0
    with open(log, errors="replace") as f:
        f.seek(start)
        text = f.read()
    with open(log, "a") as f:
        f.write(f"=== exit {'timeout' if rc is None else rc} after {seconds:.1f} s\n")
    return Ran(rc, seconds, text)


PROBE = r"""
import importlib.metadata as md, json, shutil, subprocess, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    gpu_memory_gib=round(p.total_memory / 2**30, 1))
    nvcc = shutil.which("nvcc") or (CUDA_HOME and f"{CUDA_HOME}/bin/nvcc")
    if nvcc and shutil.which(nvcc):
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        info["nvcc"] = next((ln for ln in version.splitlines() if "release" in ln), version.strip())
except Exception as e:
    info["error"] = f"{type(e).__name__}: {e}"
for name in ("numpy", "tiktoken", "pytest", "hypothesis", "pip", "setuptools", "ninja", "matplotlib"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
print("PROBE " + json.dumps(info))
"""


# -----------------------------------------------------------------------------------------------
# The check


class Check:
    """Runs the phases in order, printing to stdout and gpu_check.log, and keeps results.json current."""

    FILES = ("gpu_check.log", "results.json", "build.log", "tests.log", "bench.log", "train.log")

    def __init__(self, cc: CheckConfig):
        self.cc = cc
        self.out = Path(cc.out or os.environ.get("OUT") or ROOT / "out" / "gpu_check")
        self.out.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:  # this run's logs only; other files in the folder are left alone
            (self.out / name).unlink(missing_ok=True)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cc.budget
        self.results: dict = dict(tool="tools/gpu_check.py", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                                  budget_s=cc.budget, env={}, phases={})
        self.env: dict = {}
        self.extra_env: dict = {}  # for later phases (PYTHONPATH when the build fell back to load())

    def say(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.out / "gpu_check.log", "a") as f:
            f.write(msg + "\n")

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.results["failed"] = [n for n, p in self.results["phases"].items() if p["status"] in
                                  ("failed", "timeout")]
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        os.replace(tmp, self.out / "results.json")  # atomic: a killed run leaves the last good file

    def ok(self, name: str) -> bool:
        return self.results["phases"].get(name, {}).get("status") == "ok"

    def asked(self, name: str) -> bool:  # one left out by --phases (a build kept from before) blocks nothing
        return self.results["phases"].get(name, {}).get("reason") != "not in --phases"

    def phase(self, name: str, cap: float, fn: Callable[[float], dict], needs_gpu: bool = True,
              needs: tuple[str, ...] = ()) -> None:
        """Run fn(timeout) -> {"status", ...} unless the phase is not wanted or cannot run; record it."""
        wanted = name == "env" or self.cc.phases == "all" or name in self.cc.phases.split(",")
        left = self.deadline - time.perf_counter()
        why = ("not in --phases" if not wanted else
               "no CUDA GPU" if needs_gpu and not self.env.get("cuda") else
               next((f"{n} did not succeed" for n in needs if not self.ok(n) and self.asked(n)), None) or
               (f"out of time budget ({left:.0f} s left)" if left < min(cap, 20) else None))
        if why:
            if wanted:
                self.say(f"{why}: skipping {name}")
            self.results["phases"][name] = dict(status="skipped", reason=why)
            self.save()
            return
        self.say(f"--- {name} (timeout {min(cap, left):.0f} s)")
        t0 = time.perf_counter()
        try:
            res = fn(min(cap, left))
        except Exception as e:  # a bug here must not cost the remaining phases
            res = dict(status="failed", error=f"{type(e).__name__}: {e}")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        if res["status"] == "ok":  # the log has it all; the JSON keeps the output of failures only
            res.pop("output_tail", None)
        self.results["phases"][name] = res
        self.save()
        shown = {k: v for k, v in res.items() if k not in ("failure_text", "tables", "validation", "progress",
                                                         "output_tail", "warnings")}
        self.say(f"{name}: {res['status']} in {res['seconds']:.0f} s {json.dumps(shown)}")
        for key in ("tables", "validation"):
            for line in res.get(key, []):
                self.say(f"  {line}")
        if res["status"] != "ok":
            self.say(res.get("failure_text") or res.get("output_tail") or "")

    # --- the phases ------------------------------------------------------------------------------

    def env_phase(self, timeout: float) -> dict:
        r = run([PY, "-c", PROBE], self.out / "gpu_check.log", timeout)
        line = next((ln for ln in r.text.splitlines() if ln.startswith("PROBE ")), None)
        self.env = json.loads(line[6:]) if line else {}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            self.env["nvidia_smi"] = q.stdout.strip()
        self.results["env"] = self.env
        return dict(status="ok" if line and "error" not in self.env else "failed", output_tail=r.text[-3000:])

    def collect_phase(self, timeout: float) -> dict:
        r = run(COLLECT, self.out / "tests.log", timeout)
        res = parse_pytest(r.text)
        res.pop("failure_text", None)
        return dict(status=status(r), rc=r.rc, **res, output_tail=tail(r.text))

    def build_phase(self, timeout: float) -> dict:
        log = self.out / "build.log"
        env = dict(TORCH_CUDA_ARCH_LIST=self.env.get("capability", "9.0"), PIP_DISABLE_PIP_VERSION_CHECK="1")
        t_end = time.perf_counter() + timeout
        r = run(PIP_BUILD, log, timeout, env)
        res = dict(method="pip", pip_rc=r.rc, pip_s=round(r.seconds, 1), arch=env["TORCH_CUDA_ARCH_LIST"])
        imp = run(IMPORT_CHECK, log, 60) if r.rc == 0 else None
        nvcc_error = re.search(NVCC_ERROR, r.text) is not None
        if (imp is None or imp.rc != 0) and r.rc is not None and not nvcc_error:
            self.say("pip did not give an importable llm_kernels (no nvcc error seen): trying "
                     "torch.utils.cpp_extension.load")
            r = run(JIT_BUILD, log, t_end - time.perf_counter(), env)
            paths = [str(ROOT / JIT_DIR), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
            self.extra_env = dict(PYTHONPATH=os.pathsep.join(p for p in paths if p))
            imp = run(IMPORT_CHECK, log, 60, self.extra_env) if r.rc == 0 else None
            res.update(method="torch.utils.cpp_extension.load", load_rc=r.rc, load_s=round(r.seconds, 1))
        text = log.read_text(errors="replace")
        res["warnings"] = kernel_warnings(text)
        res["n_warnings"] = len(res["warnings"])
        ok = imp is not None and imp.rc == 0
        res["module"] = next((ln.split(": ", 1)[1] for ln in imp.text.splitlines()
                              if ln.startswith("llm_kernels:")), None) if ok else None
        return dict(status="ok" if ok else status(r, failed_if_ok=True), **res, output_tail=tail(text))

    def tests_phase(self, timeout: float) -> dict:
        r = run(TESTS, self.out / "tests.log", timeout, self.extra_env)
        res = dict(status=status(r), rc=r.rc, **parse_pytest(r.text), output_tail=tail(r.text))
        if r.rc is None:  # killed: -v printed the name of the test it was in before its outcome
            started = re.findall(r"^(tests/\S+::\S+)", r.text, re.M)
            res["hung_in"] = started[-1] if started else None
        return res

    def bench_phase(self, cmds: list[list[str]], timeout: float) -> dict:
        runs, t_end = [], time.perf_counter() + timeout
        for cmd in cmds:
            r = run(cmd, self.out / "bench.log", t_end - time.perf_counter(), self.extra_env)
            runs.append(r)
            if r.rc != 0:
                break
        text = "".join(r.text for r in runs)
        worst = next((r for r in runs if r.rc != 0), runs[-1])
        return dict(status=status(worst), rc=worst.rc, **parse_bench(text), output_tail=tail(text))

    def train_phase(self, run_name: str, timeout: float) -> dict:
        out_dir = tempfile.mkdtemp(prefix=f"gpu_check_{run_name}_")
        r = run(train_command(run_name, self.cc.train_iters, out_dir), self.out / "train.log", timeout,
                self.extra_env)
        shutil.rmtree(out_dir, ignore_errors=True)
        return dict(status=status(r), rc=r.rc, **parse_train_log(r.text), output_tail=tail(r.text))

    def run_all(self) -> int:
        c = self.cc
        self.say(f"gpu_check: budget {c.budget:.0f} s, phases {c.phases}, files in {self.out}")
        self.phase("env", 60, self.env_phase, needs_gpu=False)
        self.say(f"env: {json.dumps(self.env)}")
        self.phase("collect", 60, self.collect_phase, needs_gpu=False)
        self.phase("build", 300, self.build_phase)
        self.phase("tests", 200, self.tests_phase, needs=("build",))
        self.phase("bench", 120, lambda t: self.bench_phase([BENCH], t), needs=("build",))
        self.phase("train_default", 90, lambda t: self.train_phase("train_default", t))
        self.phase("train_124m", 120, lambda t: self.train_phase("train_124m", t))
        self.phase("bench_T", 90, lambda t: self.bench_phase(BENCH_T, t), needs=("bench",))
        self.phase("train_124m_flash", 120, lambda t: self.train_phase("train_124m_flash", t),
                   needs=("build",))
        self.save()
        failed = self.results["failed"]
        self.say(f"gpu_check: done in {self.results['elapsed_s']:.0f} s; "
                 + (f"FAILED: {', '.join(failed)}" if failed else "no phase failed")
                 + f"; results in {self.out / 'results.json'}")
        return 1 if failed else 0


def status(r: Ran, failed_if_ok: bool = False) -> str:
    return "timeout" if r.rc is None else "ok" if r.rc == 0 and not failed_if_ok else "failed"


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def main(argv: list[str]) -> int:
    try:
        cc = gpt.config_from_args(CheckConfig, argv, __doc__, "tools/gpu_check.py")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(cc.phases.split(",")) - set(PHASES) - {"all"})
    error = (f"--phases: unknown {', '.join(unknown)}; the phases are {', '.join(PHASES)}" if unknown else
             "--budget must be > 0" if not cc.budget > 0 else
             "--train_iters must be >= 1" if cc.train_iters < 1 else None)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return Check(cc).run_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
