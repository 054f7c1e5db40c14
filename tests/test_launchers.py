"""The cluster launch scripts' examples, run as dry runs with a fake SLURM / TPU environment.

``launch/slurm.sbatch`` and ``launch/tpu_pod.sh`` with ``DRY_RUN=1`` print what each task / worker
would run (its process id, the coordinator, the environment). Every example in their headers and
in docs/scaling_out.md is run that way here; each printed command must name a launcher and a config
that exist, and its flags must parse: the launcher module is loaded without running its main
and absl parses the command line, which loads the config file and applies every
``--config.key=value`` override (an unknown key or a bad value is an error).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(REPO, "launch", "slurm.sbatch")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")

# Expands a SLURM node list the way `scontrol show hostnames` does (node[01-03] / a,b).
SCONTROL_STUB = r"""#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: unexpected $*" >&2; exit 2; }
exec python3 - "$3" <<'PY'
import re, sys
m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", sys.argv[1])
if m:
  width = len(m[2])
  for i in range(int(m[2]), int(m[3]) + 1):
    print(f"{m[1]}{i:0{width}d}")
else:
  print(*sys.argv[1].split(","), sep="\n")
PY
"""

# Loads a launcher without running it and parses each command line with its absl flags.
PARSE_FLAGS = r"""
import json, runpy, sys
from absl import app, flags
script, argvs = sys.argv[1], json.loads(sys.argv[2])
# As a program (the multi-stage launchers define their flags under __main__), minus app.run.
app.run = lambda *args, **kwargs: None
runpy.run_path(script, run_name="__main__")
out = []
for argv in argvs:
  flags.FLAGS.unparse_flags()
  flags.FLAGS([script] + argv)
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  out.append({"workdir": getattr(flags.FLAGS, "workdir", None),
              "config": None if config is None else config.to_dict()})
print("FLAGS_OK " + json.dumps(out, default=str))
"""


def _header_examples(path: str, start: str) -> list[str]:
  """The example commands in a script's header comment: lines ``#   <start>...`` with their
  ``\\`` continuations, joined."""
  lines = []
  for line in open(path):
    if not line.startswith("#"):
      break
    lines.append(line[1:].strip())
  out, i = [], 0
  while i < len(lines):
    if lines[i].startswith(start):
      cmd = lines[i]
      while cmd.endswith("\\"):
        i += 1
        cmd = cmd[:-1] + " " + lines[i]
      if "[" not in cmd.split("launch/")[0]:  # not the usage synopsis ([OPTIONAL] parts)
        out.append(cmd)
    i += 1
  return out


def _doc_examples(pattern: str) -> list[str]:
  text = open(os.path.join(REPO, "docs", "scaling_out.md")).read()
  return [m.group(0).strip() for m in re.finditer(pattern, text, re.M)]


def _slurm_examples():
  return _header_examples(SLURM, "sbatch ") + _doc_examples(r"^sbatch .*slurm\.sbatch.*$")


def _tpu_examples():
  return _header_examples(TPU_POD, "TPU_NAME=") + _doc_examples(r"^TPU_NAME=.*tpu_pod\.sh.*$")


def _check_command(argv: list[str]) -> tuple[str, list[str]]:
  """``python SCRIPT ARGS`` / ``python -m MODULE ARGS``: the script (or module) exists; returns
  (script path or '', args)."""
  assert os.path.basename(argv[0]).startswith("python"), argv
  if argv[1] == "-m":
    module = argv[2]
    assert os.path.isfile(os.path.join(REPO, *module.split(".")) + ".py"), module
    return "", argv[3:]
  script = os.path.join(REPO, argv[1])
  assert os.path.isfile(script), f"{argv[1]} does not exist"
  for arg in argv[2:]:
    if arg.startswith("--config="):
      config_file = arg.split("=", 1)[1].split(":", 1)[0]
      assert os.path.isfile(os.path.join(REPO, config_file)), f"{config_file} does not exist"
  return script, argv[2:]


def _parse_flags(commands: list[tuple[str, list[str]]]) -> list[dict]:
  """absl-parses every (script, args) in one subprocess per script; returns the parsed values."""
  by_script: dict[str, list[list[str]]] = {}
  for script, args in commands:
    if script:
      by_script.setdefault(script, []).append(args)
  parsed = []
  for script, argvs in by_script.items():
    result = subprocess.run([sys.executable, "-c", PARSE_FLAGS, script,
                             json.dumps(argvs)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, f"{script} {argvs}:\n{result.stderr[-3000:]}"
    line = [l for l in result.stdout.splitlines() if l.startswith("FLAGS_OK ")][-1]
    parsed += json.loads(line[len("FLAGS_OK "):])
  return parsed


def _split_env(words: list[str]) -> tuple[dict, list[str]]:
  env = {}
  while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


@pytest.fixture(scope="module")
def stub_bin(tmp_path_factory):
  folder = tmp_path_factory.mktemp("stub_bin")
  (folder / "scontrol").write_text(SCONTROL_STUB)
  (folder / "scontrol").chmod(0o755)
  return str(folder)


def _slurm_dry_run(example: str, stub_bin: str) -> tuple[dict, list[dict]]:
  """Runs one ``sbatch [OPTIONS] launch/slurm.sbatch ARGS`` example as a dry run inside a fake
  allocation sized by its options; returns (allocation, one dict per printed task)."""
  words = shlex.split(example)
  where = words.index("launch/slurm.sbatch")
  options = dict(w.lstrip("-").split("=", 1) for w in words[1:where])
  nodes = int(options.get("nodes", 2))  # the script's #SBATCH defaults: 2 nodes, 1 task each
  per_node = int(options.get("ntasks-per-node", 1))
  gpus = int(options.get("gpus-per-node", 8))
  alloc = {
      "nodes": [f"gpu{i:02d}" for i in range(1, nodes + 1)], "tasks": nodes * per_node,
      "per_node": per_node, "gpus": gpus}
  env = {
      **os.environ, "PATH": f"{stub_bin}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
      "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_JOB_NUM_NODES": str(nodes),
      "SLURM_NTASKS": str(nodes * per_node), "SLURM_NTASKS_PER_NODE": str(per_node),
      "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_SUBMIT_DIR": REPO, "SLURM_PROCID": "0"}
  result = subprocess.run(["bash", SLURM, *words[where + 1:]], env=env, capture_output=True,
                          text=True, timeout=60, cwd="/")
  assert result.returncode == 0, f"{example}:\n{result.stderr}"
  tasks = []
  for line in result.stdout.splitlines():
    if line.startswith("task="):
      task_env, command = _split_env(shlex.split(line))
      tasks.append({"env": task_env, "command": command})
  return alloc, tasks


def test_slurm_examples_dry_run_one_command_per_task_with_its_process_id(stub_bin):
  examples = _slurm_examples()
  assert len(examples) >= 4, examples  # the header's three and the docs' selfcheck
  commands = []
  for example in examples:
    alloc, tasks = _slurm_dry_run(example, stub_bin)
    assert len(tasks) == alloc["tasks"], example
    for p, task in enumerate(tasks):
      env = task["env"]
      assert env["task"] == str(p) and env["JAX_PROCESS_ID"] == str(p)
      assert env["node"] == alloc["nodes"][p // alloc["per_node"]]  # block distribution
      assert env["JAX_COORDINATOR_ADDRESS"] == f"{alloc['nodes'][0]}:29500"
      assert env["JAX_NUM_PROCESSES"] == str(alloc["tasks"])
      if alloc["per_node"] == 1:  # one task owns every GPU of its node
        assert env["JAX_LOCAL_DEVICE_IDS"] == ",".join(map(str, range(alloc["gpus"])))
      else:  # one task per GPU: jax's default, the GPU numbered SLURM_LOCALID
        assert "JAX_LOCAL_DEVICE_IDS" not in env
      assert task["command"] == tasks[0]["command"]  # every process runs the same program
    commands.append(_check_command(tasks[0]["command"]))
  for p in _parse_flags(commands):  # a method's config names it; the pipeline's lists its stages
    assert p["workdir"] and ("method" in p["config"] or "stages" in p["config"]), p


def test_slurm_without_an_allocation_says_so():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  result = subprocess.run(["bash", SLURM, "-m", "rlhf_jax.parallel.selfcheck"],
                          env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
  assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


def test_tpu_pod_examples_dry_run_every_worker_with_the_first_as_coordinator():
  examples = _tpu_examples()
  assert len(examples) >= 2, examples
  workers = ["t1v-n-0", "t1v-n-1", "t1v-n-2", "t1v-n-3"]
  commands = []
  for example in examples:
    example_env, rest = _split_env(shlex.split(example))
    assert rest[0] == "launch/tpu_pod.sh" and len(rest) == 2, example
    env = {**os.environ, **example_env, "DRY_RUN": "1", "TPU_WORKER_HOSTNAMES": ",".join(workers)}
    result = subprocess.run(["bash", TPU_POD, rest[1]], env=env, capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, f"{example}:\n{result.stderr}"
    gcloud = [shlex.split(l) for l in result.stdout.splitlines() if l.startswith("gcloud ")]
    assert gcloud and all(g[1:5] == ["compute", "tpus", "tpu-vm", g[4]] for g in gcloud)
    assert all("--worker=all" in g and example_env["TPU_NAME"] in " ".join(g) for g in gcloud)
    if example_env.get("SYNC"):
      scp = next(g for g in gcloud if g[4] == "scp")
      for item in scp[scp.index("--recurse") + 1:-4]:  # what is copied to the workers exists
        assert os.path.exists(os.path.join(REPO, item)), item
    lines = [shlex.split(l) for l in result.stdout.splitlines() if l.startswith("worker=")]
    assert len(lines) == len(workers)
    for i, words in enumerate(lines):
      worker_env, command = _split_env(words)
      assert worker_env == {
          "worker": str(i), "host": workers[i], "TPU_WORKER_ID": str(i),
          "coordinator": f"{workers[0]}:8476", "processes": str(len(workers))}
      assert command[:2] == ["bash", "-c"]
      remote = command[2]
      assert remote.startswith("cd ~/rlhf_jax && RLHF_JAX_DISTRIBUTED=1 ")
    commands.append(_check_command(shlex.split(remote.split("RLHF_JAX_DISTRIBUTED=1 ", 1)[1])))
  parsed = _parse_flags(commands)
  for p in parsed:
    assert p["workdir"] and p["config"].get("method"), p


def test_stage_launchers_compilation_cache_setting(monkeypatch, tmp_path):
  # --compilation_cache: auto = <workdir>/jax_cache on a local workdir, off on a remote one or
  # with ''; a JAX_COMPILATION_CACHE_DIR the user set wins (jax.config itself is not touched here)
  import jax  # pylint: disable=import-outside-toplevel

  from rlhf_jax import cli  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  local = str(tmp_path / "run")
  assert cli.enable_compilation_cache("auto", local) == os.path.join(local, "jax_cache")
  assert calls == [("jax_compilation_cache_dir", os.path.join(local, "jax_cache"))]
  assert cli.enable_compilation_cache("auto", "gs://bucket/run") == ""
  assert cli.enable_compilation_cache("", local) == ""
  assert cli.enable_compilation_cache(str(tmp_path / "c"), local) == str(tmp_path / "c")
  assert len(calls) == 2
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
  assert cli.enable_compilation_cache("auto", local) == "/somewhere" and len(calls) == 2
