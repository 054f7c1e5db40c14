"""`python -m rlhf_jax.models.hf <command> [--flags]`: Hugging Face checkpoint tools.

  check --path=DIR [--num_prompts=3 --length=16 --tolerance=1e-4 --kl_tolerance=1e-6]
      Our forward vs transformers' (needs torch) on a few seeded random prompts of the checkpoint's
      vocabulary; prints max |dlogit| (absolute and relative to the logit scale) and the KL
      KL(p_hf || p_ours) per prompt; exit 1 past a tolerance. In the spirit of MaxText's
      forward_pass_logit_checker.

  export --workdir=RUN --out=DIR [--dtype=float32 --step=N --no_tokenizer]
      A finished run (SFT / DPO / PRO / RAFT / PPO policy, or a reward model) as a Hugging Face
      folder transformers loads (models/hf/export.py).

Commands live in `COMMANDS` (name -> (add_arguments, run)); another module adds one with
`register_command(name, add_arguments, run)` (run(args) -> exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

import numpy as np

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[Any], int]]] = {}


def register_command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[Any], int]) -> None:
  COMMANDS[name] = (add_arguments, run)


def _check_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--path", required=True, help="checkpoint folder (config.json + safetensors)")
  p.add_argument("--num_prompts", type=int, default=3)
  p.add_argument("--length", type=int, default=16, help="tokens per prompt (capped by context)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                 help="both models run in this dtype")
  p.add_argument("--tolerance", type=float, default=None,
                 help="max |dlogit| / max |logit| allowed (default 1e-4 f32, 3e-2 bf16/f16)")
  p.add_argument("--kl_tolerance", type=float, default=None,
                 help="max KL(p_hf || p_ours) per position allowed (default 1e-6 f32, 1e-2 else)")


def kl_rows(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """KL(softmax(ref) || softmax(ours)) per row, in float64."""
  a = ref_logits.astype(np.float64)
  b = logits.astype(np.float64)
  la = a - a.max(-1, keepdims=True)
  la = la - np.log(np.exp(la).sum(-1, keepdims=True))
  lb = b - b.max(-1, keepdims=True)
  lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
  return (np.exp(la) * (la - lb)).sum(-1)


def load_for_check(path: str, dtype: str):
  from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
  return hf.load_pretrained(path, dtype=dtype, param_dtype=dtype)


def run_check(args: Any) -> int:
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"check: needs torch and transformers installed ({e})", file=sys.stderr)
    return 2
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models import Transformer  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.hf import checkpoint  # pylint: disable=import-outside-toplevel
  path = checkpoint._strip(args.path)  # pylint: disable=protected-access
  narrow = args.dtype != "float32"
  tol = args.tolerance if args.tolerance is not None else (3e-2 if narrow else 1e-4)
  kl_tol = args.kl_tolerance if args.kl_tolerance is not None else (1e-2 if narrow else 1e-6)
  config, params = load_for_check(path, args.dtype)
  model = Transformer(config)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[args.dtype]
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                                attn_implementation="eager").eval()
  rng = np.random.default_rng(args.seed)
  length = max(1, min(args.length, config.max_seq_len))
  worst_rel = worst_kl = 0.0
  print(f"{path}: {config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}, "
        f"{args.dtype}")
  for i in range(args.num_prompts):
    tokens_T = rng.integers(0, config.vocab_size, size=length)
    with torch.no_grad():
      ref = ref_model(input_ids=torch.tensor(tokens_T[None])).logits[0].float().numpy()
    ours = np.asarray(
        model.apply({"params": params}, jnp.asarray(tokens_T[None])).logits_BxTxV[0], np.float32)
    delta = float(np.abs(ours - ref).max())
    rel = delta / max(float(np.abs(ref).max()), 1e-30)
    kl = kl_rows(ref, ours)
    worst_rel, worst_kl = max(worst_rel, rel), max(worst_kl, float(kl.max()))
    print(f"prompt {i}: {length} tokens  max|dlogit| {delta:.3e} (relative {rel:.3e})  "
          f"KL mean {kl.mean():.3e} max {kl.max():.3e}")
  ok = worst_rel <= tol and worst_kl <= kl_tol
  print(f"{'OK' if ok else 'FAIL'}: relative max|dlogit| {worst_rel:.3e} (tolerance {tol:g}), "
        f"max KL {worst_kl:.3e} (tolerance {kl_tol:g})")
  return 0 if ok else 1


register_command("check", _check_args, run_check)

# export --workdir=RUN --out=DIR: a finished run as a Hugging Face folder (models/hf/export.py).
from rlhf_jax.models.hf import export as _export  # noqa: E402  pylint: disable=wrong-import-position

register_command("export", _export.add_arguments, _export.run_export)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax.models.hf",
                                   description="Hugging Face checkpoint tools")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (add_arguments, _) in COMMANDS.items():
    add_arguments(sub.add_parser(name))
  args = parser.parse_args(argv)
  return COMMANDS[args.command][1](args)
