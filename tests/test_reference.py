"""The one reference-log-prob transform: table lookup by dataset index for every batch layout, the
cache key (a table is reused only when everything that made it matches), on-the-fly rows."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from rlhf_jax import models
from rlhf_jax.algorithms import reference
from rlhf_jax.data import batching
from rlhf_jax.data import dataset as ds_lib
from rlhf_jax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def _dataset(tmp_path, kind, rows, name="ds"):
  src = tmp_path / f"{name}.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return ds_lib.prepare_dataset(str(src), kind, TOK, str(tmp_path / name), max_prompt_len=8,
                                max_response_len=8)


PAIRS = [{"prompt": "p", "chosen": "a" * (i + 1), "rejected": "b"} for i in range(5)]
LISTS = [{
    "prompt": "p", "responses": ["a" * (i + 1), "bb", "c"][:2 + i % 2],
    "scores": [2, 1, 0][:2 + i % 2]} for i in range(5)]


def _lengths_fn(calls):
  """A stand-in reference: 'log-prob' of a row = minus its number of response tokens."""

  def fn(params, tokens, mask, loss_mask):
    calls.append(len(tokens))
    return -np.asarray(loss_mask).sum(-1).astype(np.float32)

  return fn


@pytest.mark.parametrize("kind,rows,r", [("pairwise", PAIRS, 2), ("ranked", LISTS, 3)])
def test_table_lookup_by_index_matches_on_the_fly_for_pairs_and_lists(tmp_path, kind, rows, r):
  ds = _dataset(tmp_path, kind, rows)
  calls = []
  key = {"reference_run": "x", "reference_step": 1}
  table = reference.precompute_table(ds, _lengths_fn(calls), None, str(tmp_path / "t.npz"), key,
                                     batch_size=2)
  assert table.shape == (5, r)
  fly = reference.ReferenceLogps(_lengths_fn([]), None)
  pre = reference.ReferenceLogps(None, None, table)
  it = batching.BatchIterator(ds, 2, seed=3, drop_remainder=False, num_epochs=1, process_index=0,
                              process_count=1)
  for batch in it:  # shuffled, with a filler row in the last batch
    a, b = fly(batch)["ref_logps"], pre(batch)["ref_logps"]
    assert b.shape == (batch["tokens"].shape[0],)
    real = np.repeat(batch["valid"] > 0, r)
    np.testing.assert_array_equal(a[real], b[real])
    assert np.all(b[~real] == 0.0)
  wrong = dict(batch, tokens=batch["tokens"][:len(batch["valid"])])
  with pytest.raises(ValueError, match="rows per example"):
    reference.lookup(table, wrong)
  with pytest.raises(ValueError, match="batch\\['index'\\]"):
    reference.lookup(table, {k: v for k, v in batch.items() if k != "index"})


def test_a_stored_table_is_reused_only_when_its_whole_key_matches(tmp_path):
  ds = _dataset(tmp_path, "pairwise", PAIRS)
  other_ds = _dataset(tmp_path, "pairwise", PAIRS[:4], name="other")
  path = str(tmp_path / "ref.npz")
  base = dict(reference_run=str(tmp_path / "sft"), reference_step=6, model_config={"d": 1},
              tokenizer=TOK)
  key = reference.cache_key(dataset=ds, **base)
  calls = []
  fn = _lengths_fn(calls)
  reference.precompute_table(ds, fn, None, path, key, batch_size=2)
  n = len(calls)
  reference.precompute_table(ds, fn, None, path, dict(key), batch_size=2)
  assert len(calls) == n  # same key: reused
  for change in ({"reference_step": 9}, {"reference_run": str(tmp_path / "other_ref")},
                 {"model_config": {"d": 2}}):
    changed = reference.cache_key(dataset=ds, **{**base, **change})
    assert changed != key
    reference.precompute_table(ds, fn, None, path, changed, batch_size=2)
    assert len(calls) > n, change  # recomputed
    n = len(calls)
    reference.precompute_table(ds, fn, None, path, key, batch_size=2)  # back to the first key
    n = len(calls)
  assert reference.cache_key(dataset=other_ds, **base) != key  # another dataset, another table
  stored = np.load(path)
  assert json.loads(str(stored["key"])) == key


def test_on_the_fly_uses_the_one_summed_logprob_function_and_keeps_iterator_state(tmp_path):
  ds = _dataset(tmp_path, "pairwise", PAIRS)
  model = models.Transformer(models.get_model_config("tiny"))
  dummy = jnp.ones((1, 8), jnp.int32)
  params = meta.unbox(model.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
  transform = reference.make_transform("on_the_fly", model=model, params=params, mesh=None)
  it = reference.WithReference(
      batching.BatchIterator(ds, 2, seed=1, process_index=0, process_count=1), transform)
  batch = next(it)
  want = models.sequence_logprobs(model, params, batch["tokens"], batch["mask"],
                                  batch["loss_mask"]).sum(-1)
  np.testing.assert_allclose(batch["ref_logps"], want, rtol=1e-5)
  state = it.get_state()
  again = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["tokens"], again["tokens"])
  with pytest.raises(ValueError, match="reference mode='cached'"):
    reference.make_transform("cached", model=model, params=params, mesh=None)
