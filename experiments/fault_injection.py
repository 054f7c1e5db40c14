r"""Fault injection against real runs (not a test): kill, corrupt, fill the disk, then resume.

  python experiments/fault_injection.py --out=/tmp/faults [--methods=sft,rm,dpo,ppo] [--seed=0]

Each method (SFT, the reward model, DPO, PPO) runs at a tiny size through the one launcher
(``experiments/run.py``, a subprocess per launch, as a user would run it), first uninterrupted (the
reference), then once per fault in a fresh workdir:

* ``kill -9 x2``: SIGKILL at two random steps, then a rerun to the end;
* ``SIGTERM``: at a random step (the launcher must exit 0 saying so), then a rerun;
* ``SIGTERM before the loop``: as soon as the workdir exists (data / model preparation);
* ``truncate`` / ``delete`` / ``flip bytes`` / ``empty step``: the latest checkpoint of a run
  stopped at a random step is corrupted (a data file cut in half, deleted, one byte inverted, the
  step folder emptied); the rerun must fall back to the previous step;
* ``disk full``: the workdir is a small tmpfs (``mount -t tmpfs``; root needed, else the fault is
  reported as not tried) that fills mid-run: the launcher must stop with one line naming the path
  and the free space; the tmpfs is then enlarged and the run resumed;
* ``finished rerun``: rerunning the finished run must be a no-op (no new metrics row).

A fault is survived when every launch ended as expected and the final params are bit-identical to
the reference's. Prints one row per fault and ``faults survived / tried``; ``<out>/results.json``
keeps them. Every launch holds the shared CPU lock (``--lock``), handed back
between launches every ~8 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "experiments", "run.py")
CONFIGS = os.path.join(REPO, "experiments", "configs")
# Steps per method (the tiny SFT / RM / DPO steps take milliseconds, so their runs are longer to
# give a kill a moving target) and checkpoint_every = steps / 4.
STEPS = {"sft": 80, "rm": 80, "dpo": 40, "ppo": 12}


def loop(method: str) -> dict:
  return {
      "loop.num_steps": STEPS[method], "loop.log_every": 1,
      "loop.checkpoint_every": STEPS[method] // 4, "loop.keep_checkpoints": 2, "loop.eval_every": 0,
      "loop.progress_every_secs": 0.0, "optim.warmup_steps": 1}


SFT = {
    "model.preset": "tiny", "data.synthetic_num_prompts": 96, "data.synthetic_num_test_prompts": 8,
    "data.batch_size": 8, "data.eval_batch_size": 8, "limits.buckets": "(80,)",
    "eval.num_sample_prompts": 2, "eval.print_samples": 0}
METHODS = {
    "sft": ("sft_synthetic.py", {**SFT, **loop("sft")}),
    "rm": ("rm_synthetic.py", {
        "data.synthetic_num_prompts": 64, "data.synthetic_num_test_prompts": 16,
        "limits.max_prompt_len": 24, "limits.max_response_len": 40, "limits.buckets": "(64,)",
        "data.batch_size": 8, "data.eval_batch_size": 16, "rm.early_stopping_patience": 0,
        **loop("rm")}),
    "dpo": ("dpo_synthetic.py", {
        "data.batch_size": 8, "limits.buckets": "(80,)", "data.num_eval_pairs": 8,
        "eval.num_prompts": 4, "eval.max_new_tokens": 8, "eval.print_samples": 0, **loop("dpo")}),
    "ppo": ("ppo_synthetic.py", {
        "data.batch_size": 4, "limits.max_response_len": 8, "ppo.num_ppo_epochs": 2,
        "ppo.num_minibatches": 2, "data.synthetic_num_prompts": 16,
        "data.synthetic_num_test_prompts": 4, "eval.num_prompts": 4, "eval.max_new_tokens": 8,
        "eval.print_samples": 0, "optim.lr": 1e-3, **loop("ppo")}),}
NEEDS = {"rm": ("sft",), "dpo": ("sft",), "ppo": ("sft", "rm")}
SOURCE_KEY = {"sft": "sources.sft_workdir", "rm": "sources.reward_model_workdir"}


class Launcher:
  """Runs ``experiments/run.py`` for one method under the CPU lock; records every launch."""

  def __init__(self, method: str, sources: dict, lock: str, log_dir: str):
    self.method, self.lock, self.log_dir = method, lock, log_dir
    config, overrides = METHODS[method]
    self.args = [sys.executable, RUN, f"--config={os.path.join(CONFIGS, config)}"]
    values = dict(overrides)
    for need in NEEDS.get(method, ()):
      values[SOURCE_KEY[need]] = sources[need]
    self.args += [f"--config.{k}={v}" for k, v in values.items()]
    self.count = 0
    self._lock_file, self._held_since = None, 0.0

  def _acquire(self) -> None:
    """Holds the CPU lock across launches, handing it back between launches every ~8 min (the
    shared rule: never hold it for more than 10 min)."""
    if self._lock_file is not None and time.time() - self._held_since < 480:
      return
    self.release()
    self._lock_file = open(self.lock, "a")
    fcntl.flock(self._lock_file, fcntl.LOCK_EX)
    self._held_since = time.time()

  def release(self) -> None:
    if self._lock_file is not None:
      fcntl.flock(self._lock_file, fcntl.LOCK_UN)
      self._lock_file.close()
      self._lock_file = None

  def run(self, workdir: str, *extra: str, until=None, send=None, timeout: float = 900) -> dict:
    """One launch; with ``until`` (a predicate on the workdir) ``send`` is sent once it holds."""
    self.count += 1
    log_path = os.path.join(self.log_dir, f"{self.method}_{self.count:02d}.log")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    self._acquire()
    with open(log_path, "w") as log:
      t0 = time.time()
      proc = subprocess.Popen(self.args + [f"--workdir={workdir}", *extra], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO)
      sent = None
      while proc.poll() is None:
        if until is not None and sent is None and until(workdir):
          proc.send_signal(send)
          sent = send
        if time.time() - t0 > timeout:
          proc.kill()
        time.sleep(0.05)
    out = open(log_path, encoding="utf-8", errors="replace").read()
    return {
        "rc": proc.returncode, "out": out, "sent": sent, "seconds": time.time() - t0,
        "log": log_path}


def train_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  for line in open(path, encoding="utf-8", errors="replace"):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("split") == "train":
      steps.append(row["step"])
  return steps


def committed(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def at_step(k: int):
  return lambda workdir: bool(train_steps(workdir)) and train_steps(workdir)[-1] >= k


def final_params(workdir: str):
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel
  return train.restore_params(workdir)


def identical(a, b) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  return len(la) == len(lb) and all(
      pa == pb and np.array_equal(np.asarray(x), np.asarray(y)) for (pa, x), (pb, y) in zip(la, lb))


def _data_files(step_dir: str) -> list[str]:
  return sorted(
      os.path.join(root, n)
      for root, _, names in os.walk(os.path.join(step_dir, "state"))
      for n in names
      if os.path.basename(root) == "d")


def corrupt(step_dir: str, how: str) -> None:
  files = _data_files(step_dir)
  if how == "truncate":
    with open(files[0], "r+b") as f:
      f.truncate(os.path.getsize(files[0]) // 2)
  elif how == "delete":
    os.remove(files[0])
  elif how == "flip bytes":
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([byte[0] ^ 0xFF]))
  elif how == "empty step":
    for name in os.listdir(step_dir):
      path = os.path.join(step_dir, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  else:
    raise ValueError(how)


def _ok(result: dict, what: str) -> str | None:
  return None if result["rc"] == 0 else f"{what} exited {result['rc']} (log {result['log']})"


def _du(path: str) -> int:
  total = 0
  for root, _, names in os.walk(path):
    for n in names:
      with contextlib.suppress(OSError):
        total += os.path.getsize(os.path.join(root, n))
  return total


def run_method(method: str, launcher: Launcher, root: str, rng: random.Random,
               kinds: list[str]) -> tuple[str, list[dict]]:
  ref_dir = os.path.join(root, "reference")
  ref = launcher.run(ref_dir)
  if ref["rc"] != 0:
    raise SystemExit(f"{method}: the reference run failed (log {ref['log']})")
  reference = final_params(ref_dir)
  rows = []
  steps, every = STEPS[method], STEPS[method] // 4

  def finish(workdir: str, problems: list[str], result: dict | None = None) -> dict:
    result = result or launcher.run(workdir)
    problem = _ok(result, "the final rerun")
    if problem:
      problems.append(problem)
    same = False
    if result["rc"] == 0:
      try:
        same = identical(final_params(workdir), reference)
      except Exception as err:  # pylint: disable=broad-except
        problems.append(f"final params unreadable: {err}")
    return {"identical": same, "survived": same and not problems, "problems": problems}

  for kind in kinds:
    workdir = os.path.join(root, kind.replace(" ", "_").replace("-", ""))
    problems: list[str] = []
    t0 = time.time()
    detail = ""
    if kind == "kill -9 x2":
      k1 = rng.randint(2, steps // 2)
      k2 = rng.randint(k1 + 2, steps - 1)
      for k in (k1, k2):
        r = launcher.run(workdir, until=at_step(k), send=signal.SIGKILL)
        if r["rc"] == 0:
          problems.append(f"finished before the kill at step {k}")
      detail = f"killed at steps >= {k1}, {k2}"
      row = finish(workdir, problems)
    elif kind == "SIGTERM":
      k = rng.randint(2, steps - 2)
      r = launcher.run(workdir, until=at_step(k), send=signal.SIGTERM)
      if r["rc"] != 0 or "stopped by SIGTERM" not in r["out"]:
        problems.append(f"SIGTERM at step {k}: exit {r['rc']} (log {r['log']})")
      detail = f"at step >= {k}; stopped at {committed(workdir)[-1:] or 'none'}"
      row = finish(workdir, problems)
    elif kind == "SIGTERM before the loop":
      r = launcher.run(workdir, until=os.path.isdir, send=signal.SIGTERM)
      if r["rc"] != 0 or "stopped by SIGTERM" not in r["out"]:
        problems.append(f"exit {r['rc']} (log {r['log']})")
      detail = f"steps logged before the stop: {len(train_steps(workdir))}"
      row = finish(workdir, problems)
    elif kind in ("truncate", "delete", "flip bytes", "empty step"):
      k = rng.randint(2, 3) * every  # a checkpoint step with one before it
      r = launcher.run(workdir, f"--config.loop.stop_after_steps={k}")
      problems += [p for p in [_ok(r, f"the run to step {k}")] if p]
      corrupt(os.path.join(workdir, "checkpoints", str(committed(workdir)[-1])), kind)
      r = launcher.run(workdir)
      fell_back = "is unusable" in r["out"] and "resuming from step" in r["out"]
      if not fell_back:
        problems.append(f"no fallback line (log {r['log']})")
      detail = f"latest step {k} corrupted"
      row = finish(workdir, problems, r)
    elif kind == "disk full":
      os.makedirs(workdir, exist_ok=True)
      ckpt = _du(os.path.join(ref_dir, "checkpoints", str(committed(ref_dir)[-1])))
      base = _du(ref_dir) - len(committed(ref_dir)) * ckpt
      size_kib = (base + int(1.5 * ckpt)) // 1024 + 64
      mounted = subprocess.run(
          ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", workdir],
          capture_output=True, text=True)
      if mounted.returncode != 0:
        rows.append({"fault": kind, "tried": False, "detail": mounted.stderr.strip()[:200]})
        continue
      try:
        r = launcher.run(workdir)
        line = [l for l in r["out"].splitlines() if "no space left on device" in l]
        if r["rc"] == 0:
          problems.append(f"the run fitted in {size_kib} KiB: nothing filled up")
        elif not line:
          problems.append(f"exit {r['rc']} without the one-line disk-full error (log {r['log']})")
        detail = f"tmpfs {size_kib} KiB; " + (line[0][:160] if line else "")
        subprocess.run(["mount", "-o", "remount,size=512m", workdir], check=True)
        row = finish(workdir, problems)
      finally:
        subprocess.run(["umount", "-l", workdir], capture_output=True)
    elif kind == "finished rerun":
      before = open(os.path.join(ref_dir, "metrics.jsonl"), "rb").read()
      r = launcher.run(ref_dir)
      if r["rc"] != 0 or "nothing to do" not in r["out"]:
        problems.append(f"exit {r['rc']}, no 'nothing to do' (log {r['log']})")
      if open(os.path.join(ref_dir, "metrics.jsonl"), "rb").read() != before:
        problems.append("metrics.jsonl changed")
      same = identical(final_params(ref_dir), reference)
      row = {"identical": same, "survived": same and not problems, "problems": problems}
    else:
      raise ValueError(kind)
    row.update({
        "fault": kind, "tried": True, "detail": detail, "seconds": round(time.time() - t0, 1)})
    rows.append(row)
    with open(os.path.join(root, "faults.json"), "w") as f:  # as it goes: a cut run keeps its rows
      json.dump(rows, f, indent=2)
    print(
        f"  {method:4s} {kind:24s} {'survived' if row['survived'] else 'LOST':8s} "
        f"identical={row['identical']}  {detail}  {'; '.join(problems)}", flush=True)
  return ref_dir, rows


FAULTS = ("kill -9 x2", "SIGTERM", "SIGTERM before the loop", "truncate", "delete", "flip bytes",
          "empty step", "disk full", "finished rerun")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/fault_injection")
  parser.add_argument("--methods", default="sft,rm,dpo,ppo")
  parser.add_argument("--faults", default=",".join(FAULTS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lock", default="/tmp/rlhf_cpu.lock")
  args = parser.parse_args()
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
  unknown = [m for m in methods if m not in METHODS] + [k for k in kinds if k not in FAULTS]
  if unknown:
    raise SystemExit(f"unknown method / fault {unknown}; allowed: {list(METHODS)} / {FAULTS}")
  rng = random.Random(args.seed)
  os.makedirs(args.out, exist_ok=True)
  sources: dict[str, str] = {}
  results: dict[str, list] = {}
  t0 = time.time()
  for method in ("sft", "rm", "dpo", "ppo"):
    needed = method in methods or any(method in NEEDS.get(m, ()) for m in methods)
    if not needed:
      continue
    root = os.path.join(args.out, method)
    logs = os.path.join(root, "logs")
    os.makedirs(logs, exist_ok=True)
    launcher = Launcher(method, sources, args.lock, logs)
    try:
      if method in methods:
        print(f"{method}: reference run + {len(kinds)} faults in {root}", flush=True)
        sources[method], results[method] = run_method(method, launcher, root, rng, kinds)
      else:  # only a source of a later method: one plain run
        ref_dir = os.path.join(root, "reference")
        if launcher.run(ref_dir)["rc"] != 0:
          raise SystemExit(f"{method}: the source run failed (logs in {logs})")
        sources[method] = ref_dir
    finally:
      launcher.release()
  tried = [r for rows in results.values() for r in rows if r["tried"]]
  survived = [r for r in tried if r["survived"]]
  identical_count = sum(r["identical"] for r in tried)
  summary = {
      "faults_tried": len(tried), "faults_survived": len(survived),
      "final_params_identical": identical_count, "seconds": round(time.time() - t0, 1),
      "date": time.strftime("%Y-%m-%d %H:%M UTC",
                            time.gmtime()), "seed": args.seed, "results": results}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  not_tried = [
      f"{m}: {r['fault']} ({r['detail']})" for m, rows in results.items() for r in rows
      if not r["tried"]]
  print(
      f"faults survived / tried: {len(survived)} / {len(tried)}; final params bit-identical to "
      f"the uninterrupted run: {identical_count} / {len(tried)}; {summary['seconds']:.0f} s" +
      (f"; not tried: {not_tried}" if not_tried else ""), flush=True)


if __name__ == "__main__":
  main()
