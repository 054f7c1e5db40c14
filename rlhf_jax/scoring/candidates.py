"""The one sample-and-score loop: K responses per prompt from a policy, scored by the reward model.

    cands = scoring.sample_candidates(model, params, tokenizer, prompts, reward=handle,
                                      num_samples=8, max_prompt_len=32, max_new_tokens=48,
                                      temperature=1.0, rng=key)
    cands.rewards_N          # [N·K] normalised, reduced RM rewards (prompt-major: row i·K + j)

RAFT's rounds, best-of-n's curve and PRO / RRHF's generated candidate lists all run this loop:

    for each chunk of ``chunk_prompts`` prompts (the last one padded by repeating its last prompt,
    so the sampler and the RM compile one shape):
      encode the prompts left-padded to ``max_prompt_len`` ([BOS] prompt)
      place them split over the mesh's batch axes (``parallel.shard_rows``)
      sample K responses each with the KV-cache sampler, key ``fold_in(rng, start)``
      score them on the token path (``scoring.score``: the response as sampled, EOS iff emitted,
      the handle's attribute reduction)
      read the rows back (``parallel.to_host``), keep the real ones, decode the responses

Everything comes back as host NumPy arrays with N·K rows (N prompts, K samples each).

Multi-host: every process passes the same N prompts; each places its own slice of every chunk
(its devices sample and score only those rows), and the whole chunk comes back to every process
through ``parallel.to_host``, so every process holds the same candidates (a selection over them —
RAFT's, best-of-n's — is then the same decision everywhere). The mesh is the reward model's
(``reward.mesh``, the run's mesh in every method) unless one is given.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from rlhf_jax import parallel, sampling
from rlhf_jax.data import batching
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.scoring import reward_model as rm_lib


class Candidates(NamedTuple):
  """K sampled responses per prompt and their rewards; every array has N·K rows (prompt-major)."""

  prompt_tokens: np.ndarray  # [N·K, P] left-padded [BOS] prompt
  prompt_mask: np.ndarray  # [N·K, P]
  response_tokens: np.ndarray  # [N·K, R] right-padded, EOS included when emitted
  response_mask: np.ndarray  # [N·K, R]
  rewards_N: np.ndarray  # [N·K] float32, scoring.score of each (prompt, response)
  finished_N: np.ndarray  # [N·K] bool, the response emitted EOS within the budget
  texts: list  # N·K decoded responses (special ids dropped)
  num_samples: int  # K

  def full_sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, mask, loss_mask)`` ``[N·K, P + R]``, as ``SampleOutput.full_sequences``."""
    tokens = np.concatenate([self.prompt_tokens, self.response_tokens], axis=1)
    mask = np.concatenate([self.prompt_mask, self.response_mask], axis=1)
    loss_mask = np.concatenate([np.zeros_like(self.prompt_mask), self.response_mask], axis=1)
    return tokens, mask, loss_mask

  def nonempty_N(self, eos_id: int) -> np.ndarray:
    """``[N·K]`` bool: the response has at least one token besides EOS."""
    return np.sum((self.response_mask > 0) & (self.response_tokens != eos_id), axis=1) > 0

  def grid(self, x_N: np.ndarray) -> np.ndarray:
    """A per-row array reshaped to ``[N, K]``."""
    return np.asarray(x_N).reshape(-1, self.num_samples, *np.shape(x_N)[1:])


# Prompts per sampler call by default (x K rows each): what a memory plan of the callers assumes.
CHUNK_PROMPTS = 64


def sample_candidates(model: Any, params: Any, tokenizer: tok_lib.Tokenizer, prompts: Sequence[str],
                      *, reward: rm_lib.RewardModelHandle, num_samples: int, max_prompt_len: int,
                      max_new_tokens: int, temperature: float, rng: jax.Array, top_k: int = 0,
                      top_p: float = 1.0, chunk_prompts: int = CHUNK_PROMPTS,
                      mesh: jax.sharding.Mesh | None = None) -> Candidates:
  """Samples ``num_samples`` responses for every prompt and scores them (module docstring).

  Args:
    model, params: the policy (a ``Transformer``) and its params.
    tokenizer: the policy's tokenizer (its EOS ends a response; it decodes the texts).
    prompts: N prompt strings.
    reward: the reward model; its attribute reduction applies (``scoring.load_reward_model``).
    num_samples: K. max_prompt_len: prompt width (prompts are cut from the left).
    max_new_tokens, temperature, top_k, top_p: the sampler's settings.
    rng: the base key; chunk ``start`` samples with ``fold_in(rng, start)``.
    chunk_prompts: prompts per sampler call (K rows each).
    mesh: where the prompts are placed (split over its batch axes when a chunk's rows divide
      evenly, else replicated); default ``reward.mesh``.
  """
  if not prompts:
    raise ValueError("sample_candidates: no prompts given")
  if not (isinstance(chunk_prompts, int) and chunk_prompts >= 1):
    raise ValueError(f"sample_candidates: chunk_prompts={chunk_prompts!r}; allowed: an int >= 1")
  samp = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, num_samples=num_samples,
                                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  mesh = reward.mesh if mesh is None else mesh
  prompts = list(prompts)
  chunk = min(chunk_prompts, len(prompts))
  parts: dict[str, list] = {k: [] for k in ("pt", "pm", "rt", "rm", "r")}
  for start in range(0, len(prompts), chunk):
    texts = prompts[start:start + chunk]
    rows = len(texts) * num_samples
    texts = texts + [texts[-1]] * (chunk - len(texts))  # one compiled shape
    enc = batching.encode_prompts(tokenizer, texts, max_prompt_len=max_prompt_len,
                                  buckets=(max_prompt_len,))
    # every process holds the whole chunk and places its slice of the rows
    placed = parallel.shard_rows({"t": enc["prompt_tokens"], "m": enc["prompt_mask"]}, mesh)
    out = sampling.sample(model, params, placed["t"], placed["m"], jax.random.fold_in(rng, start),
                          samp)
    rewards = rm_lib.score(reward, out.prompt_tokens, out.prompt_mask, out.response_tokens_BxR,
                           out.response_mask_BxR)
    # one collective per chunk: the rows of every process, on every process
    host = parallel.to_host((out.prompt_tokens, out.prompt_mask, out.response_tokens_BxR,
                             out.response_mask_BxR, rewards))
    for key, value in zip(("pt", "pm", "rt", "rm", "r"), host):
      parts[key].append(np.asarray(value)[:rows])
  pt, pm, rt, rmask, r = (np.concatenate(parts[k]) for k in ("pt", "pm", "rt", "rm", "r"))
  finished = np.any((rt == tokenizer.eos_id) & (rmask > 0), axis=1)
  texts = [tokenizer.decode(t[m > 0]) for t, m in zip(rt, rmask)]
  return Candidates(pt.astype(np.int32), pm.astype(np.int32), rt.astype(np.int32),
                    rmask.astype(np.int32), r.astype(np.float32), finished, texts, num_samples)
