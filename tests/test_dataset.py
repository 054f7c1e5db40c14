"""TFDS array_record datasets (written and read without TensorFlow) and the batch iterator."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.data import batching as B
from rlhf_jax.data import kinds
from rlhf_jax.data import dataset as D
from rlhf_jax.data import records as rec
from rlhf_jax.data import synthetic_files as sf
from rlhf_jax.data.tokenizers import ByteTokenizer, ChatTemplate, TokenIdError

TOK = ByteTokenizer()


class OtherTokenizer(ByteTokenizer):
  kind = "other-bytes"


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("syn") / "task"
  sf.write_task(str(root), sf.SyntheticConfig(seed=0, num_prompts=45, num_test_prompts=0))
  return root


@pytest.fixture(scope="module")
def datasets(synthetic_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("ds")
  files = {
      "prompt": "prompts", "sft": "sft", "pairwise": "pairwise", "ranked": "ranked",
      "rated": "rated", "attributes": "attributes"}
  result = {}
  for kind, stem in files.items():
    kwargs = {"scale": (1, 7)} if kind in ("rated", "attributes") else {}
    result[kind] = D.prepare_dataset(str(synthetic_dir / f"{stem}.jsonl"), kind, TOK,
                                     str(out / kind), max_prompt_len=32, max_response_len=48,
                                     **kwargs)
  return result


def _bytes(ids):
  """Raw bytes of stored byte-tokenizer ids (which are byte + 3)."""
  return bytes((np.asarray(ids) - 3).astype(np.uint8).tolist())


def _text(tokens, mask):
  return TOK.decode(np.asarray(tokens)[np.asarray(mask) == 1])


def test_roundtrip_every_kind(datasets, synthetic_dir):
  for kind, ds in datasets.items():
    assert len(ds) == 45 and ds.kind == kind
    assert ds.metadata["tokenizer"]["fingerprint"] == TOK.fingerprint()
    assert ds.lengths.shape == (45,)
  sft_rows = rec.read_records(str(synthetic_dir / "sft.jsonl"), "sft")
  batch = B.collate(datasets["sft"].get_batch(range(3)), "sft", datasets["sft"].special_ids, 64)
  for i in range(3):
    tokens, mask, loss_mask = batch["tokens"][i], batch["mask"][i], batch["loss_mask"][i]
    n = int(mask.sum())
    assert tokens[0] == TOK.bos_id and tokens[n -
                                              1] == TOK.eos_id and np.all(tokens[n:] == TOK.pad_id)
    assert _text(tokens, mask) == sft_rows[i].prompt + sft_rows[i].response
    assert _text(tokens, loss_mask) == sft_rows[i].response  # loss on response + EOS only
    assert loss_mask[n - 1] == 1 and loss_mask.sum() == len(sft_rows[i].response.encode()) + 1

  ds = datasets["sft"]
  for got, want in zip(ds.get_batch([5, 2, 9, 2]), [ds[5], ds[2], ds[9], ds[2]]):
    assert all(np.array_equal(got[k], want[k]) for k in want)  # any order, repeats allowed

  ranked_rows = rec.read_records(str(synthetic_dir / "ranked.jsonl"), "ranked")
  ds = datasets["ranked"]
  k = ds.metadata["max_candidates"]
  batch = B.collate(ds.get_batch([0, 1]), "ranked", ds.special_ids, 64, num_candidates=k)
  assert batch["tokens"].shape == (2 * k, 64) and batch["candidate_mask"].shape == (2, k)
  for i in range(2):
    n = len(ranked_rows[i].responses)
    assert batch["candidate_mask"][i].tolist() == [1] * n + [0] * (k - n)
    assert batch["scores"][i, :n].tolist() == list(ranked_rows[i].scores)
    for j in range(n):  # candidate j of list i is row i*K + j
      assert _text(batch["tokens"][i * k + j],
                   batch["loss_mask"][i * k + j]) == ranked_rows[i].responses[j]
    assert batch["mask"][i * k + n:(i + 1) * k].sum() == 0

  pair_rows = rec.read_records(str(synthetic_dir / "pairwise.jsonl"), "pairwise")
  ds = datasets["pairwise"]
  batch = B.collate(ds.get_batch([0, 1]) + [None], "pairwise", ds.special_ids, 64)
  assert batch["tokens"].shape == (6, 64) and batch["valid"].tolist() == [1, 1, 0]
  chosen, rejected = kinds.pairwise.split(batch["loss_mask"])
  tokens_c, tokens_r = kinds.pairwise.split(batch["tokens"])
  for i in range(2):  # pair i: chosen in row 2i, rejected in row 2i+1
    assert _text(tokens_c[i], chosen[i]) == pair_rows[i].chosen
    assert _text(tokens_r[i], rejected[i]) == pair_rows[i].rejected
    assert _text(batch["tokens"][2 * i + 1], batch["loss_mask"][2 * i + 1]) == pair_rows[i].rejected
  assert batch["mask"][4:].sum() == 0  # the filler pair's two rows
  kept = B.take_examples(batch, [1])
  assert kept["tokens"].shape == (2, 64) and np.array_equal(kept["tokens"], batch["tokens"][2:4])

  ds = datasets["attributes"]
  attrs = B.collate(ds.get_batch([0]), "attributes", ds.special_ids, 64,
                    num_attributes=2)["attributes"]
  first = rec.read_records(str(synthetic_dir / "attributes.jsonl"), "attributes")[0]
  assert datasets["attributes"].metadata["attribute_names"] == ["harmless", "helpful"]
  assert attrs[0].tolist() == [first.attribute("harmless"), first.attribute("helpful")]


def test_prepare_synthetic_datasets(tmp_path):
  config = sf.SyntheticConfig(seed=2, num_prompts=20, num_test_prompts=10)
  out = sf.prepare_synthetic_datasets(str(tmp_path), TOK, config=config, kinds=("sft", "pairwise"))
  assert sorted(out) == ["metadata", "pairwise", "pairwise_test", "sft", "sft_test"]
  assert len(out["sft"]) == 20 and len(out["pairwise_test"]) == 10
  assert out["sft"].metadata["truncated_prompts"] == out["sft"].metadata["truncated_responses"] == 0
  again = sf.prepare_synthetic_datasets(str(tmp_path), TOK, config=config, kinds=("sft",))
  assert again["sft"].path == out["sft"].path
  with pytest.raises(ValueError, match=r"another SyntheticConfig \(differs in \['seed'\]\)"):
    sf.prepare_synthetic_datasets(
        str(tmp_path), TOK, config=sf.SyntheticConfig(seed=3, num_prompts=20, num_test_prompts=10))
  with pytest.raises(ValueError, match="'dpo'"):
    sf.prepare_synthetic_datasets(str(tmp_path), TOK, config=config, kinds=("dpo",))


def test_unicode_and_truncation(tmp_path):
  rows = [
      {"prompt": "日本語のプロンプトです", "response": "emoji 😀 answer"},
      {"prompt": "short", "response": "r" * 30},]
  src = _jsonl(tmp_path / "u.jsonl", rows)
  ds = D.prepare_dataset(src, "sft", TOK, str(tmp_path / "u"), max_prompt_len=8,
                         max_response_len=10)
  ex0, ex1 = ds[0], ds[1]
  assert _bytes(ex0["prompt"]) == "日本語のプロンプトです".encode()[-7:]  # kept the end (left truncation)
  assert _bytes(ex0["response"]) == b"emoji \xf0\x9f\x98"  # kept the start, cut mid-character
  assert len(ex1["response"]) == 9 and ds.metadata["truncated_prompts"] == 1
  assert ds.metadata["truncated_responses"] == 2 and int(ds.lengths.max()) <= 18

  flipped = D.prepare_dataset(src, "sft", TOK, str(tmp_path / "f"), max_prompt_len=8,
                              max_response_len=10,
                              truncation=D.Truncation(prompt="right", response="left"))
  assert _bytes(flipped[0]["prompt"]) == "日本語のプロンプトです".encode()[:7]
  dropped = D.prepare_dataset(src, "sft", TOK, str(tmp_path / "d"), max_prompt_len=8,
                              max_response_len=40,
                              truncation=D.Truncation(prompt="drop", response="drop"))
  assert len(
      dropped) == 1 and dropped.metadata["dropped"] == 1 and dropped.metadata["num_records"] == 2
  with pytest.raises(ValueError,
                     match=r"record 0 prompt has 33 tokens > limit 7 and truncation is 'error'"):
    D.prepare_dataset(src, "sft", TOK, str(tmp_path / "e"), max_prompt_len=8, max_response_len=40,
                      truncation=D.Truncation(prompt="error"))
  assert not os.path.exists(tmp_path / "e")
  with pytest.raises(ValueError, match="Truncation.prompt='middle'"):
    D.Truncation(prompt="middle")
  with pytest.raises(ValueError, match="max_prompt_len=1"):
    D.prepare_dataset(src, "sft", TOK, str(tmp_path / "x"), max_prompt_len=1, max_response_len=40)


def test_fingerprint_cache_and_mismatch(tmp_path, monkeypatch):
  src = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}] * 3)
  out = str(tmp_path / "ds")
  D.prepare_dataset(src, "sft", TOK, out, max_prompt_len=8, max_response_len=8)
  with pytest.raises(D.DatasetMismatchError, match=r"tokenised with byte-v259-.*other-bytes-v259"):
    D.open_dataset(out, OtherTokenizer())
  with pytest.raises(D.DatasetMismatchError, match=r"other-bytes"):
    D.prepare_dataset(src, "sft", OtherTokenizer(), out, max_prompt_len=8, max_response_len=8)
  # Cached: the second call neither reads the JSONL nor rebuilds.
  monkeypatch.setattr(rec, "read_records", lambda *a, **k: pytest.fail("rebuilt a cached dataset"))
  assert len(D.prepare_dataset(src, "sft", TOK, out, max_prompt_len=8, max_response_len=8)) == 3
  with pytest.raises(D.DatasetMismatchError, match=r"max_response_len: stored 8 != requested 9"):
    D.prepare_dataset(src, "sft", TOK, out, max_prompt_len=8, max_response_len=9)
  chat = ByteTokenizer(chat_template=ChatTemplate(message_format="{role}: {content}\n"))
  with pytest.raises(D.DatasetMismatchError, match=r"chat_template: stored"):
    D.prepare_dataset(src, "sft", chat, out, max_prompt_len=8, max_response_len=8)
  monkeypatch.undo()
  _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "changed"}] * 3)
  with pytest.raises(D.DatasetMismatchError, match=r"source_sha256"):
    D.prepare_dataset(src, "sft", TOK, out, max_prompt_len=8, max_response_len=8)
  ds = D.prepare_dataset(src, "sft", TOK, out, max_prompt_len=8, max_response_len=8, overwrite=True)
  assert _bytes(ds[0]["response"]) == b"changed"
  assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "ds"]  # no temporary or old folders left
  with pytest.raises(FileNotFoundError, match="no rlhf_jax dataset"):
    D.open_dataset(str(tmp_path))


def test_write_is_atomic(tmp_path, monkeypatch):
  src = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])

  def crash(self, *args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(D._RecordsBuilder, "download_and_prepare", crash)
  with pytest.raises(RuntimeError, match="disk full"):
    D.prepare_dataset(src, "sft", TOK, str(tmp_path / "ds"), max_prompt_len=8, max_response_len=8)
  assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_token_ids_checked(tmp_path, datasets):

  class BadTokenizer(ByteTokenizer):
    kind = "bad"

    def encode(self, text):
      return [300] if text == "boom" else super().encode(text)

  with pytest.raises(TokenIdError, match=r"record 1 response: token id 300"):
    D.write_dataset([rec.SFTRecord("a", "b"), rec.SFTRecord("a", "boom")], "sft", BadTokenizer(),
                    str(tmp_path / "bad"), max_prompt_len=8, max_response_len=8)
  it = B.BatchIterator(datasets["sft"], 4, process_index=0, process_count=1, vocab_size=100)
  with pytest.raises(TokenIdError, match=r"batch tokens \(epoch 0, batch 0\): token id 1\d\d"):
    next(it)


def test_buckets():
  assert B.default_buckets(80) == (16, 32, 64, 80)
  assert B.default_buckets(64) == (16, 32, 64)
  assert B.default_buckets(10) == (10,)
  assert B.bucket_length(17, (16, 32)) == 32
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    B.bucket_length(33, (16, 32))


def test_iterator_epochs_shapes_and_determinism(datasets):
  ds = datasets["pairwise"]
  it = B.BatchIterator(ds, 8, seed=3, process_index=0, process_count=1, num_epochs=2)
  batches = list(it)
  assert len(batches) == 2 * (45 // 8) and it.batches_per_epoch == 5
  for b, batch in enumerate(batches):
    t = batch["tokens"].shape[1]
    assert t in it.buckets and batch["tokens"].shape == (16, t)
    assert B.bucket_length(int(batch["mask"].sum(1).max()), it.buckets) == t
    assert batch["index"].tolist() == it.global_indices(b // 5, b % 5).tolist()
  # Epoch orders differ but each is a permutation; the same seed reproduces them.
  epoch0 = np.concatenate([it.global_indices(0, b) for b in range(5)])
  epoch1 = np.concatenate([it.global_indices(1, b) for b in range(5)])
  assert len(set(epoch0.tolist())) == 40 and not np.array_equal(epoch0, epoch1)
  again = list(B.BatchIterator(ds, 8, seed=3, process_index=0, process_count=1, num_epochs=2))
  for a, b in zip(batches, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other = next(B.BatchIterator(ds, 8, seed=4, process_index=0, process_count=1))
  assert not np.array_equal(other["tokens"], batches[0]["tokens"])
  ordered = B.BatchIterator(ds, 8, shuffle=False, process_index=0, process_count=1)
  assert ordered.global_indices(0, 1).tolist() == list(range(8, 16))


def test_no_drop_remainder_visits_everything_once(datasets):
  ds = datasets["rated"]
  it = B.BatchIterator(ds, 8, seed=1, drop_remainder=False, num_epochs=1, process_index=0,
                       process_count=1)
  batches = list(it)
  assert len(batches) == 6 and [int(b["valid"].sum()) for b in batches] == [8] * 5 + [5]
  last = batches[-1]
  assert last["tokens"].shape[0] == 8 and last["mask"][5:].sum() == 0 and np.all(
      last["rating"][5:] == 0)
  assert last["index"][5:].tolist() == [-1] * 3 and np.all(last["index"][:5] >= 0)
  seen = np.concatenate([b["index"][b["valid"] == 1] for b in batches])
  assert sorted(seen.tolist()) == list(range(45))
  for b in batches:  # the index names the example each row holds
    for row in np.flatnonzero(b["valid"]):
      assert b["rating"][row] == ds[int(b["index"][row])]["rating"]
  ratings = np.concatenate([b["rating"][b["valid"] == 1] for b in batches])
  expected = [ds[i]["rating"] for i in range(45)]
  assert sorted(ratings.tolist()) == sorted(float(r) for r in expected)


def test_host_slicing_reassembles_global_batch(datasets):
  # Sequence rows are example major, so the hosts' slices concatenate into the global batch
  # (what parallel.shard_batch does on several processes) for lists and pairs alike.
  for kind, rows in (("ranked", datasets["ranked"].metadata["max_candidates"]), ("pairwise", 2)):
    ds = datasets[kind]
    single = B.BatchIterator(ds, 8, seed=7, process_index=0, process_count=1)
    hosts = [B.BatchIterator(ds, 8, seed=7, process_index=h, process_count=2) for h in range(2)]
    for _ in range(3):
      full = next(single)
      parts = [next(h) for h in hosts]
      assert parts[0]["tokens"].shape == (4 * rows,) + full["tokens"].shape[1:]
      for key in full:
        assert np.array_equal(np.concatenate([p[key] for p in parts]), full[key]), key
  ds = datasets["ranked"]
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    B.BatchIterator(ds, 8, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index=2"):
    B.BatchIterator(ds, 8, process_index=2, process_count=2)


def test_group_by_length_sorts_windows_and_keeps_the_epoch(datasets):
  ds = datasets["sft"]  # 45 examples
  make = lambda g, **kw: B.BatchIterator(ds, 4, seed=5, process_index=0, process_count=1,
                                         group_by_length=g, buckets=tuple(range(4, 84, 4)), **kw)
  plain, grouped = make(0), make(3)
  assert plain.batches_per_epoch == grouped.batches_per_epoch == 11
  for epoch in (0, 1):
    base = np.concatenate([plain.global_indices(epoch, b) for b in range(11)])
    got = np.concatenate([grouped.global_indices(epoch, b) for b in range(11)])
    assert sorted(got.tolist()) == sorted(base.tolist())  # the same kept examples, once each
    # hand-built: windows of 3 batches (12 examples) of the plain order, sorted longest first,
    # then the 11 batches visited in the order drawn from default_rng([seed, epoch, 1])
    windows = [base[i:i + 12] for i in range(0, 44, 12)]
    flat = np.concatenate([w[np.argsort(-ds.lengths[w], kind="stable")] for w in windows])
    order = np.random.default_rng([5, epoch, 1]).permutation(11)
    np.testing.assert_array_equal(got, flat.reshape(11, 4)[order].reshape(-1))
  width = lambda it: sum(next(it)["tokens"].shape[1] for _ in range(11))
  assert width(make(3)) < width(make(0))  # narrower batches over one epoch
  run = make(3)
  expected = [next(run) for _ in range(14)]  # crosses the epoch end
  resumed = make(3)
  for _ in range(5):
    next(resumed)
  state = resumed.get_state()
  again = make(3)
  again.set_state(state)
  for want in expected[5:]:
    got = next(again)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  with pytest.raises(ValueError, match="group_by_length=3 but this iterator has group_by_length=0"):
    make(0).set_state(state)
  with pytest.raises(ValueError, match="group_by_length=-1"):
    make(-1)


def test_resume_mid_epoch_and_across_epochs(datasets):
  ds = datasets["sft"]
  make = lambda: B.BatchIterator(ds, 4, seed=11, process_index=0, process_count=1)
  reference = make()
  expected = [next(reference) for _ in range(25)]  # 11 batches per epoch: crosses two epoch ends
  for stop in (3, 11, 12, 20):
    run = make()
    for _ in range(stop):
      next(run)
    state = run.get_state()
    assert all(isinstance(v, int) for v in state.values())
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))  # survives a JSON / checkpoint round trip
    for want in expected[stop:]:
      got = next(resumed)
      assert all(np.array_equal(got[k], want[k]) for k in want)
  with pytest.raises(ValueError, match="seed=11 but this iterator has seed=12"):
    B.BatchIterator(ds, 4, seed=12, process_index=0, process_count=1).set_state(state)
  with pytest.raises(ValueError, match="out of range"):
    make().set_state({"epoch": 0, "batch_in_epoch": 99})


def test_prompt_batches(datasets):
  batch = next(
      B.BatchIterator(datasets["prompt"], 4, shuffle=False, process_index=0, process_count=1))
  tokens, mask = batch["prompt_tokens"], batch["prompt_mask"]
  assert tokens.shape == (4, 32)
  for i in range(4):
    n = int(mask[i].sum())
    assert np.all(mask[i, -n:] == 1) and np.all(tokens[i, :-n] == TOK.pad_id)  # left-padded
    assert tokens[i, -n] == TOK.bos_id and _text(tokens[i], mask[i]) == TOK.decode(
        datasets["prompt"][i]["prompt"])
  enc = B.encode_prompts(TOK, ["name 2 fruits", "x" * 50], max_prompt_len=20)
  assert enc["prompt_tokens"].shape == (2, 20)
  assert TOK.decode(
      enc["prompt_tokens"][0]) == "name 2 fruits" and enc["prompt_mask"][0].sum() == 14
  assert enc["prompt_mask"][1].sum() == 20 and enc["prompt_tokens"][1, 0] == TOK.bos_id
  short = B.encode_prompts(TOK, ["hi"], max_prompt_len=64)
  assert short["prompt_tokens"].shape == (1, 16)


def test_prepare_dataset_drops_uninformative_records_and_counts_them(tmp_path):
  pairs = _jsonl(tmp_path / "pairs.jsonl",
                 [{"prompt": "name 1 fruits", "chosen": "fig!", "rejected": "fig!"}, {
                     "prompt": "name 1 fruits", "chosen": "fig!", "rejected": "gun"}, {
                         "prompt": "list 2 tools", "chosen": "saw", "rejected": "saw"}])
  limits = dict(max_prompt_len=16, max_response_len=16)
  ds = D.prepare_dataset(pairs, "pairwise", TOK, str(tmp_path / "p"), drop_uninformative=True,
                         **limits)
  assert len(
      ds) == 1 and ds.metadata["dropped_uninformative"] == 2 and ds.metadata["num_records"] == 1
  assert _bytes(ds[0]["rejected"]) == b"gun"
  kept_all = D.prepare_dataset(pairs, "pairwise", TOK, str(tmp_path / "all"), **limits)
  assert len(kept_all) == 3 and kept_all.metadata["dropped_uninformative"] == 0
  with pytest.raises(D.DatasetMismatchError,
                     match="drop_uninformative: stored True != requested None"):
    D.prepare_dataset(pairs, "pairwise", TOK, str(tmp_path / "p"), **limits)
  ties = _jsonl(tmp_path / "ties.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
  with pytest.raises(ValueError,
                     match="every one of its 1 pairwise records has chosen == rejected"):
    D.prepare_dataset(ties, "pairwise", TOK, str(tmp_path / "t"), drop_uninformative=True, **limits)

  lists = _jsonl(
      tmp_path / "ranked.jsonl",
      [{"prompt": "name 1 fruits", "responses": ["fig", "gun", "kiwi"], "scores": [1.0, 1.0, 1.0]
       }, {"prompt": "name 1 fruits", "responses": ["fig", "gun"], "ranks": [1, 2]},
       {"prompt": "list 2 tools", "responses": ["saw", "rake", "gun"], "scores": [0.5, 0.5, 0.0]}])
  ds = D.prepare_dataset(lists, "ranked", TOK, str(tmp_path / "r"), drop_uninformative=True,
                         **limits)
  assert len(
      ds) == 2 and ds.metadata["dropped_uninformative"] == 1 and ds.metadata["max_candidates"] == 3
  # cut to 2 candidates first: the third list becomes a tie as well
  cut = D.prepare_dataset(lists, "ranked", TOK, str(tmp_path / "r2"), drop_uninformative=True,
                          max_candidates=2, **limits)
  assert len(cut) == 1 and cut.metadata["dropped_uninformative"] == 2 and cut.metadata[
      "max_candidates"] == 2
  with pytest.raises(ValueError, match="num_candidates=2 < the dataset's longest list"):
    B.BatchIterator(ds, 2, num_candidates=2, process_index=0, process_count=1)
  batch = next(
      B.BatchIterator(ds, 2, num_candidates=4, shuffle=False, process_index=0, process_count=1))
  assert batch["tokens"].shape[0] == 8 and batch["candidate_mask"].tolist() == [[1, 1, 0, 0],
                                                                                [1, 1, 1, 0]]


def test_a_new_kind_is_one_module_and_one_registration(tmp_path):
  """KTO-style unpaired records through every reader and writer, registered from outside."""
  import dataclasses

  from rlhf_jax.data.kinds import base, sft

  @dataclasses.dataclass(frozen=True)
  class UnpairedRecord:
    prompt: str
    completion: str
    label: bool

  def parse(ctx, obj):
    label = ctx.get(obj, "label")
    if not isinstance(label, bool):
      raise ctx.error("label", "true or false", label)
    return UnpairedRecord(ctx.prompt(obj), ctx.string(obj, "completion", non_empty=True), label)

  def collate(examples, specials, length, **_):
    rows = [(ex["prompt"], ex["response"]) if ex is not None else None for ex in examples]
    batch = base.pack_sequences(rows, specials, length)
    batch["label"] = np.asarray([ex["label"] if ex is not None else 0 for ex in examples], np.int32)
    return batch

  kinds.register_kind(
      base.RecordKind(
          name="test_unpaired", record_type=UnpairedRecord, parse=parse,
          features={"response": base.INT_SEQ, "label": ((), np.int32)}, encode=lambda r, enc: {
              "response": enc.response(r.completion, "completion"), "label": np.int32(r.label)},
          length=sft.response_length, collate=collate, file_stem="unpaired"))
  src = _jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "yes", "label": True}, {
      "prompt": "q", "completion": "no", "label": False}])
  ds = D.prepare_dataset(src, "test_unpaired", TOK, str(tmp_path / "u"), max_prompt_len=8,
                         max_response_len=8)
  batch = next(B.BatchIterator(ds, 2, shuffle=False, process_index=0, process_count=1))
  assert batch["label"].tolist() == [1, 0] and batch["tokens"].shape == (2, 16)
  assert _text(batch["tokens"][0], batch["loss_mask"][0]) == "yes"
  bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "yes", "label": "maybe"}])
  with pytest.raises(rec.RecordError, match="bad.jsonl:1: field 'label': expected true or false"):
    rec.read_records(bad, "test_unpaired")
  with pytest.raises(ValueError, match="already registered"):
    kinds.register_kind(dataclasses.replace(kinds.get_kind("test_unpaired")))
