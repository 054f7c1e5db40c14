"""Direct RLAIF (d-RLAIF): an AI evaluator's rating as the reward of PPO's rollouts, no reward model.

Lee et al., 2023 (arXiv:2309.00267, §2.2.2): the evaluator rates each response on a 1..10 scale
(here a ``"single"`` template: ``feedback/templates/synthetic_rating.json``, labels 0..9) and the
reward is the expected rating rescaled to [-1, 1]:

    P(v | x, y) = softmax_v log π_E(ℓ_v | q(x, y))         q = the rendered rating query
    r(x, y)     = 2 (Σ_v v·P(v | x, y) - v_min) / (v_max - v_min) - 1

:func:`evaluator_reward_handle` wraps this as a :class:`~rlhf_jax.scoring.RewardModelHandle`
whose "model" is :class:`EvaluatorRewardModel` (a Flax module over the evaluator's Transformer, one
output, identity normalisation μ = 0, σ = 1). Everything that scores with a handle — PPO's jitted
scoring phase (``rollout.make_score_fn``), ``scoring.score`` / ``sample_reward_fn`` (policy
evaluation), best-of-n — then scores with the evaluator unchanged.

Token path (jitted, no text round trip): a rollout row is ``[left-padded [BOS] prompt | right-padded
response]`` in the policy's tokens. The query is spliced in token space,

    [BOS] prefix | prompt (BOS masked) | middle | response (EOS masked) | suffix

where prefix / middle / suffix are the template's text around ``{prompt}`` and ``{response}``
(preamble, exemplars and ending included), each tokenised once. Padding and the masked BOS/EOS stay
in place with mask 0: positions come from the mask and padded keys are masked out, so this equals
the compact sequence, and the last column (the ending's last token) predicts the rating label.
Splicing needs the evaluator to share the policy's tokenizer (an error says so otherwise; the text
path :func:`rlhf_jax.feedback.evaluator.ratings` re-tokenises instead). It is exactly the text
query's token ids for the byte tokenizer; for a BPE tokenizer the template pieces and the
prompt/response are tokenised separately (merges never cross a piece boundary).

The prompt / response boundary is ``T - response_len``: every caller scores sampler outputs whose
response block has ``max_new_tokens = response_len`` columns (PPO's ``limits.max_response_len``;
set ``config.eval.max_new_tokens`` to the same value).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import models, parallel
from rlhf_jax.scoring import reward_model as rm_lib

__all__ = ["EvaluatorRewardModel", "evaluator_reward_handle", "template_pieces"]

_SP, _SR = "\x00PROMPT\x00", "\x00RESPONSE\x00"


def template_pieces(template) -> tuple[str, str, str]:
  """``(prefix, middle, suffix)``: the rating query's text around ``{prompt}`` and ``{response}``."""
  from rlhf_jax.feedback import templates as tpl  # pylint: disable=import-outside-toplevel
  text = tpl.render_single(template, _SP, _SR)
  if text.count(_SP) != 1 or text.count(_SR) != 1 or text.index(_SP) > text.index(_SR):
    raise tpl.TemplateError(
        template.source, "single",
        "{prompt} once, before {response} once (d-RLAIF splices the query in "
        "token space)")
  prefix, rest = text.split(_SP)
  middle, suffix = rest.split(_SR)
  return prefix, middle, suffix


class EvaluatorRewardModel(nn.Module):
  """``(tokens_BxT, mask_BxT) -> [B, 1]`` d-RLAIF reward of rollout rows (module docstring).

  Params: ``{"evaluator": <the evaluator Transformer's params>}``.
  """

  config: models.ModelConfig
  prefix_ids: tuple[int, ...]  # [BOS] + the text before {prompt}
  middle_ids: tuple[int, ...]
  suffix_ids: tuple[int, ...]
  label_ids: tuple[int, ...]
  label_values: tuple[float, ...]
  response_len: int
  bos_id: int
  eos_id: int
  num_outputs: int = 1

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    lm = models.Transformer(self.config, name="evaluator")
    b, t = tokens_BxT.shape
    if self.is_initializing():  # abstract init with a dummy batch: just create the params
      lm(tokens_BxT, mask_BxT)
      return jnp.zeros((b, 1), jnp.float32)
    p = t - self.response_len
    if p < 1:
      raise ValueError(
          f"EvaluatorRewardModel: rows of {t} columns but response_len="
          f"{self.response_len}; allowed: [prompt | response] rows whose response block "
          "has response_len columns (the sampler's max_new_tokens)")
    tokens_BxT = tokens_BxT.astype(jnp.int32)
    mask_BxT = mask_BxT.astype(jnp.int32)
    prompt_BxP, response_BxR = tokens_BxT[:, :p], tokens_BxT[:, p:]
    prompt_mask = mask_BxT[:, :p] * (prompt_BxP != self.bos_id)
    response_mask = mask_BxT[:, p:] * (response_BxR != self.eos_id)

    def piece(ids):
      return jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (b, len(ids)))

    pieces = [
        piece(self.prefix_ids), prompt_BxP,
        piece(self.middle_ids), response_BxR,
        piece(self.suffix_ids)]
    masks = [
        jnp.ones((b, len(self.prefix_ids)), jnp.int32), prompt_mask,
        jnp.ones((b, len(self.middle_ids)), jnp.int32), response_mask,
        jnp.ones((b, len(self.suffix_ids)), jnp.int32)]
    query_BxQ, query_mask_BxQ = jnp.concatenate(pieces, 1), jnp.concatenate(masks, 1)
    logits_BxV = lm(query_BxQ, query_mask_BxQ).logits_BxTxV[:, -1].astype(jnp.float32)
    label_logp_BxL = jax.nn.log_softmax(logits_BxV, axis=-1)[:, jnp.asarray(self.label_ids)]
    probs_BxL = jax.nn.softmax(label_logp_BxL, axis=-1)
    values_L = jnp.asarray(self.label_values, jnp.float32)
    lo, hi = min(self.label_values), max(self.label_values)
    reward_B = 2.0 * (probs_BxL @ values_L - lo) / (hi - lo) - 1.0
    return reward_B[:, None]


def evaluator_reward_handle(ev, policy_tokenizer, *, response_len: int, max_prompt_len: int,
                            mesh=None, rules=parallel.DEFAULT_RULES,
                            batch_size: int = 64) -> rm_lib.RewardModelHandle:
  """A reward handle that scores with the evaluator ``ev`` (``feedback.evaluator.Evaluator`` with a
  ``"single"`` template); ``response_len``: the response columns of every scored row."""
  from rlhf_jax.feedback import templates as tpl  # pylint: disable=import-outside-toplevel
  if ev.template.kind != "single":
    raise tpl.TemplateError(ev.template.source, "kind",
                            "'single' (d-RLAIF rates one response at a time)", ev.template.kind)
  if policy_tokenizer.fingerprint() != ev.tokenizer.fingerprint():
    raise rm_lib.TokenizerMismatchError(
        f"d-RLAIF evaluator {ev.source}: its tokenizer {ev.tokenizer!r} differs from the policy's "
        f"{policy_tokenizer!r}; the in-rollout reward splices the query in token space, so it "
        "needs the policy's tokenizer (label AI preferences with the text path and distil a "
        "reward model instead: feedback.evaluator.pair_labels)")
  prefix, middle, suffix = template_pieces(ev.template)
  tok = ev.tokenizer
  module = EvaluatorRewardModel(
      config=ev.model.config, prefix_ids=tuple([tok.bos_id] + list(tok.encode(prefix))),
      middle_ids=tuple(tok.encode(middle)), suffix_ids=tuple(tok.encode(suffix)),
      label_ids=ev.label_ids, label_values=ev.template.label_values, response_len=int(response_len),
      bos_id=tok.bos_id, eos_id=tok.eos_id)
  info = rm_lib.RewardModelInfo(model=dataclasses.asdict(ev.model.config),
                                output_names=("evaluator_rating",), tokenizer_spec="",
                                tokenizer_fingerprint=tok.fingerprint(),
                                max_prompt_len=max_prompt_len, max_response_len=response_len,
                                mean=(0.0,), std=(1.0,),
                                normalization={"source": "none: the rating is already on [-1, 1]"
                                              }, objective="d_rlaif")
  mesh = mesh or rm_lib.default_mesh()
  shardings = rm_lib.param_shardings(module, mesh, rules)
  # multi-process: the evaluator was restored onto this process's device, the mesh is global
  params = parallel.device_put_global({"evaluator": nn.meta.unbox(ev.params)}, shardings)
  ways = int(np.prod([mesh.shape[a] for a in np.atleast_1d(parallel.batch_axes(rules))]))
  data = parallel.data_sharding(mesh, rules)
  jitted = jax.jit(lambda prm, t, m: module.apply({"params": prm}, t, m),
                   in_shardings=(shardings, data, data),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

  def run(params_, tokens_BxT, mask_BxT):
    with parallel.use_mesh(mesh, rules):
      return jitted(params_, tokens_BxT, mask_BxT)

  return rm_lib.RewardModelHandle(info=info, model=module, params=params, tokenizer=tok, mesh=mesh,
                                  rules=tuple(rules), batch_size=-(-batch_size // ways) * ways,
                                  batch_ways=ways, attribute_weights=(1.0,), _score_jit=run)
