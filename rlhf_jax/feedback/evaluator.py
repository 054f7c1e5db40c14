"""The AI evaluator of RLAIF: a causal LM + a template file → soft preference labels and ratings.

    ev = load_evaluator("workdirs/feedback_model", "synthetic_pair", policy_tokenizer=tok)
    labels = pair_labels(ev, prompts, responses_a, responses_b)     # PairLabels, both orders
    labels.p_N                 # P(a ≻ b), averaged over both orders: label(a,b) + label(b,a) = 1
    labels.position_bias_rate  # fraction of pairs whose preferred *position* survives the swap
    label_fn = evaluator_annotator(ev)                               # the annotator interface

Soft label (Lee et al., 2023, arXiv:2309.00267, §2.1.1): with ``q`` the rendered query ending in
the template's ending and ``ℓ_1 .. ℓ_L`` the label tokens,

    P(label = ℓ_k | q) = exp(log π_E(ℓ_k | q)) / Σ_j exp(log π_E(ℓ_j | q))

(the softmax over the label tokens' next-token log-probs; ``label_mass`` = Σ_j π_E(ℓ_j | q) is how
much of the evaluator's next-token mass the labels get, a format-following diagnostic).

Position bias (§2.1.1): a pair is scored as (a, b) and as (b, a); with p_ab = P("A" | a first) and
p_ba = P("A" | b first),

    P(a ≻ b) = (p_ab + (1 - p_ba)) / 2

computed once per unordered pair (the lexicographically first order is the canonical one) and
returned as ``1 - P`` for the other order, so ``label(a, b) + label(b, a) = 1`` holds bit for bit.
``position_bias_rate`` = mean over pairs of ``[p_ab > ½] = [p_ba > ½]`` (the same position wins
both times). ``both_orders=False`` returns p_ab alone (the ablation).

Chain of thought (§2.1.2; optional, the template's ``cot_ending``): the evaluator first samples a
rationale after ``cot_ending`` (``rlhf_jax.sampling``; it stops at a newline or EOS), then the
rationale and ``cot_answer`` are appended and the label tokens scored as above.

Ratings (d-RLAIF, Lee et al. §2.2.2; a ``"single"`` template): P(v) over the rating labels, the
expected rating E = Σ_v v·P(v) and the reward E rescaled from [v_min, v_max] to [-1, 1]
(:func:`rescale_rating`); :mod:`rlhf_jax.scoring.evaluator_reward` runs the same computation inside
PPO's jitted scoring phase.

The evaluator is any causal LM of this codebase: a trained run (``train.load_sft_params``: an SFT
run such as the synthetic feedback model, or a PPO run's policy), a Hugging Face checkpoint
(``hf:DIR``), or a preset with random weights (``preset:NAME``, for tests). It reads text: when its
tokenizer differs from the policy's the texts are simply re-tokenised (a log line says so).
Scoring is one jitted forward per (batch, width bucket): queries are batched longest first and
``[BOS] query`` is left-padded to the batch's width bucket (steps of 32), so the last column is
every row's last real token and a batch carries little padding. Rationales are sampled the same way
(greedy by default; with temperature sampling the draws depend on the batch a query lands in).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, sampling
from rlhf_jax.data import batching
from rlhf_jax.data import tokenizers as tok_lib
from rlhf_jax.feedback import templates as tpl

__all__ = [
    "PRESET_PREFIX", "Evaluator", "PairLabels", "CotConfig", "load_evaluator", "make_evaluator",
    "label_probs", "pair_labels", "ratings", "rescale_rating", "evaluator_annotator"]

PRESET_PREFIX = "preset:"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CotConfig:
  """Rationale sampling for chain-of-thought labels.

  Attributes:
    max_tokens: rationale budget (it stops earlier at a newline or EOS).
    temperature: sampling temperature (``greedy=True`` for argmax decoding).
    greedy: argmax decoding (deterministic rationales).
    seed: base of the sampler's key (chunk i uses ``fold_in(seed key, i)``).
  """

  max_tokens: int = 32
  temperature: float = 1.0
  greedy: bool = True
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.max_tokens,
                  bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise ValueError(f"CotConfig.max_tokens={self.max_tokens!r}; allowed: an int >= 1")
    if not self.temperature > 0:
      raise ValueError(f"CotConfig.temperature={self.temperature!r}; allowed: a float > 0")


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A causal LM (``model`` / ``params`` / ``tokenizer``) queried through ``template``."""

  model: Any  # models.Transformer
  params: Any  # unboxed param tree
  tokenizer: Any
  template: tpl.Template
  label_ids: tuple[int, ...]
  source: str = ""
  batch_size: int = 64

  @property
  def max_len(self) -> int:
    return self.model.config.max_seq_len


class PairLabels(NamedTuple):
  """Labels of N pairs (float64 ``[N]`` arrays); see the module docstring."""

  p_N: np.ndarray  # P(a ≻ b): both orders averaged (or p_ab_N with both_orders=False)
  p_ab_N: np.ndarray  # P(first position) with a first
  p_ba_N: np.ndarray  # P(first position) with b first (NaN with both_orders=False)
  position_bias_rate: float  # fraction of pairs whose preferred position survives the swap (NaN: one order)
  label_mass: float  # mean Σ_j π_E(ℓ_j | q) over the scored queries
  rationales: tuple = ()  # CoT: the rationales of the (a, b) queries (then of the (b, a) queries)


def make_evaluator(model: Any, params: Any, tokenizer: Any, template: tpl.Template | str, *,
                   source: str = "", batch_size: int = 64,
                   policy_tokenizer: Any = None) -> Evaluator:
  """An evaluator over in-memory params; checks the label tokens against ``tokenizer``."""
  template = tpl.load_template(template) if isinstance(template, str) else template
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"evaluator batch_size={batch_size!r}; allowed: an int >= 1")
  label_ids = tpl.label_token_ids(template, tokenizer)
  vocab = model.config.vocab_size
  if max(label_ids) >= vocab:
    raise tpl.TemplateError(template.source, "labels", f"token ids below the evaluator's "
                            f"vocab_size {vocab}", label_ids)
  if policy_tokenizer is not None and policy_tokenizer.fingerprint() != tokenizer.fingerprint():
    log.warning(
        "evaluator %s: its tokenizer %r differs from the policy's %r; the evaluator reads "
        "the texts re-tokenised with its own tokenizer", source or "<in memory>", tokenizer,
        policy_tokenizer)
  return Evaluator(model, params, tokenizer, template, label_ids, source, batch_size)


def load_evaluator(source: str, template: tpl.Template | str, *, policy_tokenizer: Any = None,
                   batch_size: int = 64, seed: int = 0, **pretrained_kwargs) -> Evaluator:
  """Loads the evaluator ``source``: a run workdir, ``hf:DIR`` or ``preset:NAME`` (random init
  with ``seed``, byte tokenizer; for tests and smoke runs)."""
  from rlhf_jax import train  # pylint: disable=import-outside-toplevel  (train imports the world)
  if not isinstance(source, str) or not source:
    raise ValueError(f"evaluator source={source!r}; allowed: a trained run's workdir, 'hf:DIR' or "
                     f"'{PRESET_PREFIX}NAME'")
  if source.startswith(PRESET_PREFIX):
    config = models.get_model_config(source[len(PRESET_PREFIX):])
    model = models.Transformer(config)
    dummy = jnp.ones((1, 8), jnp.int32)
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), dummy, dummy))["params"]
    tokenizer = tok_lib.load_tokenizer("byte")
  else:
    ckpt = train.load_sft_params(source, **pretrained_kwargs)
    model, params, tokenizer = models.Transformer(ckpt.model_config), ckpt.params, ckpt.tokenizer
    # a feedback model started from an exported byte-tokenizer SFT run reads with ByteTokenizer
    # (the export's tokenizer.json encodes identically; feedback.feedback_model)
    from rlhf_jax.feedback import feedback_model  # pylint: disable=import-outside-toplevel
    spec = feedback_model.exported_tokenizer(source)
    if spec:
      tokenizer = tok_lib.load_tokenizer(spec)
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    params = nn.meta.unbox(params)
  return make_evaluator(model, params, tokenizer, template, source=source, batch_size=batch_size,
                        policy_tokenizer=policy_tokenizer)


@functools.lru_cache(maxsize=16)
def _label_logps_fn(model: Any, label_ids: tuple[int, ...]) -> Callable:
  """Jitted ``(params, tokens_BxT, mask_BxT) -> [B, L]`` float32 log π(ℓ_k | row) at the last column."""
  ids_L = jnp.asarray(label_ids, jnp.int32)

  def fn(params, tokens_BxT, mask_BxT):
    out = model.apply({"params": params}, tokens_BxT, mask_BxT)
    logp_BxV = jax.nn.log_softmax(out.logits_BxTxV[:, -1].astype(jnp.float32), axis=-1)
    return logp_BxV[:, ids_L]

  return jax.jit(fn)


def _query_buckets(max_len: int) -> tuple[int, ...]:
  """Widths in steps of 32 up to ``max_len``: with the queries batched in length order (below) a
  batch pads to within 32 tokens of its longest query instead of to the next power of two
  (RLAIF's CoT answer queries run 213 tokens on average, 289 at most: 512 wide before)."""
  return tuple(range(32, max_len, 32)) + (max_len,)


def _length_order(texts: Sequence[str]) -> np.ndarray:
  """Indices of ``texts`` longest first by UTF-8 bytes (stable): the batches of a length-sorted
  list are narrow. Bytes are the byte tokenizer's token count and a proxy for any other (the
  order only sets the padding; :func:`_encode` tokenises each batch once)."""
  lengths = np.asarray([len(t.encode("utf-8")) for t in texts])
  return np.argsort(-lengths, kind="stable")


def _chunks(ev: Evaluator, texts: Sequence[str]):
  """``(indices, chunk)`` batches of ``texts`` in length order; the last chunk is filled up with
  copies of its last text so every batch has one compiled batch size."""
  order = _length_order(texts)
  size = min(ev.batch_size, len(texts))
  for start in range(0, len(texts), ev.batch_size):
    idx = order[start:start + ev.batch_size]
    chunk = [texts[i] for i in idx]
    yield idx, chunk + [chunk[-1]] * (size - len(chunk))


def _encode(ev: Evaluator, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """``[BOS] text`` left-padded to a width bucket (texts cut from the left to max_len)."""
  lengths = [len(ids) + 1 for ids in ev.tokenizer.encode_batch(list(texts))]
  if max(lengths) > ev.max_len:
    log.warning(
        "evaluator %s: %d of %d queries exceed its max_seq_len=%d tokens (longest %d); their "
        "beginning (the preamble) is cut", ev.source, sum(n > ev.max_len for n in lengths),
        len(lengths), ev.max_len, max(lengths))
  return batching.encode_prompts(ev.tokenizer, texts, max_prompt_len=ev.max_len,
                                 buckets=_query_buckets(ev.max_len))


def label_logps(ev: Evaluator, texts: Sequence[str]) -> np.ndarray:
  """``[N, L]`` float64 next-token log-probs of the label tokens after each query text."""
  if not texts:
    raise ValueError("evaluator: no queries to score")
  fn = _label_logps_fn(ev.model, ev.label_ids)
  out = np.zeros((len(texts), len(ev.label_ids)))
  for idx, chunk in _chunks(ev, texts):
    enc = _encode(ev, chunk)
    out[idx] = np.asarray(fn(ev.params, enc["prompt_tokens"], enc["prompt_mask"]),
                          np.float64)[:len(idx)]
  return out


def label_probs(ev: Evaluator, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(probs [N, L], label_mass [N])``: the softmax over the label tokens (module docstring) and
  the evaluator's total next-token probability on them."""
  logps_NxL = label_logps(ev, texts)
  top_N = np.max(logps_NxL, axis=1, keepdims=True)
  w_NxL = np.exp(logps_NxL - top_N)
  return w_NxL / np.sum(w_NxL, axis=1, keepdims=True), np.sum(np.exp(logps_NxL), axis=1)


def rationales(ev: Evaluator, queries: Sequence[str], cot: CotConfig) -> list[str]:
  """Samples one rationale per CoT query (stops at a newline or EOS; the newline is dropped)."""
  newline = ev.tokenizer.encode("\n")
  stops = tuple(newline) if len(newline) == 1 else ()
  samp = sampling.SamplingConfig(max_new_tokens=cot.max_tokens, temperature=cot.temperature,
                                 greedy=cot.greedy, eos_id=ev.tokenizer.eos_id, stop_ids=stops,
                                 pad_id=ev.tokenizer.pad_id)
  out = [""] * len(queries)
  key = jax.random.PRNGKey(cot.seed)
  width = ev.max_len - cot.max_tokens
  for i, (idx, chunk) in enumerate(_chunks(ev, queries)):
    enc = batching.encode_prompts(ev.tokenizer, chunk, max_prompt_len=width,
                                  buckets=_query_buckets(width))
    res = sampling.sample(ev.model, ev.params, enc["prompt_tokens"], enc["prompt_mask"],
                          jax.random.fold_in(key, i), samp)
    toks, mask = jax.device_get((res.response_tokens_BxR, res.response_mask_BxR))
    for j, t, m in zip(idx, toks, mask):
      out[j] = ev.tokenizer.decode(t[m > 0]).split("\n", 1)[0]
  return out


def _score_queries(ev: Evaluator, queries: list[str], cot: CotConfig | None):
  sampled: list[str] = []
  if cot is not None:
    sampled = rationales(ev, queries, cot)
    queries = [tpl.cot_answer_text(ev.template, q, r) for q, r in zip(queries, sampled)]
  probs, mass = label_probs(ev, queries)
  return probs, mass, sampled


def pair_labels(ev: Evaluator, prompts: Sequence[str], responses_a: Sequence[str],
                responses_b: Sequence[str], *, both_orders: bool = True,
                cot: CotConfig | None = None) -> PairLabels:
  """Soft labels ``P(a ≻ b)`` of N pairs (module docstring); ``cot`` samples rationales first."""
  if not len(prompts) == len(responses_a) == len(responses_b):
    raise ValueError(f"pair_labels: {len(prompts)} prompts, {len(responses_a)} responses_a and "
                     f"{len(responses_b)} responses_b; allowed: one of each per pair")
  if ev.template.kind != "pair":
    raise ValueError(f"{ev.template.source}: pair_labels needs a template of kind 'pair', got "
                     f"'{ev.template.kind}'")
  n = len(prompts)
  if n == 0:
    return PairLabels(*(np.zeros(0),) * 3, float("nan"), float("nan"))
  with_cot = cot is not None
  # Canonical order per pair (first, second): the same unordered pair gives the same queries
  # whichever order the caller passed, so label(a, b) = 1 - label(b, a) exactly.
  swap_N = np.asarray([str(a) > str(b) for a, b in zip(responses_a, responses_b)]) & both_orders
  first = [b if s else a for a, b, s in zip(responses_a, responses_b, swap_N)]
  second = [a if s else b for a, b, s in zip(responses_a, responses_b, swap_N)]
  queries = [
      tpl.render_pair(ev.template, x, f, s, cot=with_cot)
      for x, f, s in zip(prompts, first, second)]
  if both_orders:
    queries += [
        tpl.render_pair(ev.template, x, s, f, cot=with_cot)
        for x, f, s in zip(prompts, first, second)]
  probs, mass, rationales = _score_queries(ev, queries, cot)
  p_fs_N = probs[:n, 0]  # P(position 1) with `first` in position 1
  if not both_orders:
    return PairLabels(p_fs_N, p_fs_N, np.full(n, np.nan), float("nan"), float(np.mean(mass)),
                      tuple(rationales))
  p_sf_N = probs[n:, 0]
  canon_N = 0.5 * (p_fs_N + (1.0 - p_sf_N))  # P(first ≻ second)
  p_N = np.where(swap_N, 1.0 - canon_N, canon_N)
  p_ab_N = np.where(swap_N, p_sf_N, p_fs_N)
  p_ba_N = np.where(swap_N, p_fs_N, p_sf_N)
  same_position = (p_fs_N > 0.5) == (p_sf_N > 0.5)
  return PairLabels(p_N, p_ab_N, p_ba_N, float(np.mean(same_position)), float(np.mean(mass)),
                    tuple(rationales))


def rescale_rating(expected_N: np.ndarray, values: Sequence[float]) -> np.ndarray:
  """``2 (E - v_min) / (v_max - v_min) - 1``: the expected rating mapped onto [-1, 1]."""
  lo, hi = float(min(values)), float(max(values))
  return 2.0 * (np.asarray(expected_N, np.float64) - lo) / (hi - lo) - 1.0


def ratings(ev: Evaluator, prompts: Sequence[str], responses: Sequence[str], *,
            cot: CotConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(reward_N in [-1, 1], probs_NxL)`` of single responses under a ``"single"`` template."""
  if ev.template.kind != "single":
    raise ValueError(f"{ev.template.source}: ratings need a template of kind 'single', got "
                     f"'{ev.template.kind}'")
  if len(prompts) != len(responses):
    raise ValueError(f"ratings: {len(prompts)} prompts but {len(responses)} responses")
  queries = [
      tpl.render_single(ev.template, x, y, cot=cot is not None) for x, y in zip(prompts, responses)]
  probs, _, _ = _score_queries(ev, queries, cot)
  expected_N = probs @ np.asarray(ev.template.label_values, np.float64)
  return rescale_rating(expected_N, ev.template.label_values), probs


def evaluator_annotator(ev: Evaluator, *, both_orders: bool = True,
                        cot: CotConfig | None = None) -> Callable:
  """The annotator interface ``label_fn(prompts, a, b) -> P(a ≻ b)`` over :func:`pair_labels`."""

  def label_fn(prompts, responses_a, responses_b) -> np.ndarray:
    return pair_labels(ev, list(prompts), list(responses_a), list(responses_b),
                       both_orders=both_orders, cot=cot).p_N

  return label_fn
