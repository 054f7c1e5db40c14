"""Tokenizers: byte / Hugging Face tokenizer.json / SentencePiece round-trips, specials, fingerprints,
chat template and the token-id guard."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.data import tokenizers as tk

UNICODE_TEXTS = [
    "hello world",
    "emoji 😀🚀 ok",
    "日本語のテキスト 中文",
    "cafe\u0301 n\u0303 e\u0308",  # combining marks
    "",
    "tab\tnewline\n",]


def test_byte_roundtrip_unicode():
  tok = tk.ByteTokenizer()
  assert tok.vocab_size == 259
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in UNICODE_TEXTS:
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
  assert tok.decode_batch(tok.encode_batch(UNICODE_TEXTS)) == UNICODE_TEXTS


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_roundtrip_any_text(text):
  tok = tk.ByteTokenizer()
  ids = tok.encode(text)
  tk.check_token_ids(ids, tok.vocab_size)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray([tok.bos_id] + ids + [tok.eos_id, tok.pad_id], np.int32)) == text


def test_byte_decode_specials_and_garbage():
  tok = tk.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode("hi") + [tok.eos_id, tok.pad_id]
  assert tok.decode(ids) == "hi"
  assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi<eos><pad>"
  # A truncated multi-byte character decodes with a replacement character instead of failing.
  ids = tok.encode("😀")[:2]
  assert tok.decode(ids) == "\ufffd"
  assert tok.decode(np.array(tok.encode("ab"), dtype=np.int32)) == "ab"
  with pytest.raises(tk.TokenIdError, match="token id 300 at index 0"):
    tok.decode([300])
  with pytest.raises(tk.TokenIdError, match="token id -1"):
    tok.decode([-1])
  with pytest.raises(ValueError, match=r"1-D.*shape \(1, 2\); use decode_batch"):
    tok.decode(np.array([[107, 108]]))
  assert tok.decode(iter([107, 108])) == "hi" and tok.decode([]) == ""


def test_check_token_ids():
  tk.check_token_ids([0, 5, 258], 259)
  tk.check_token_ids(np.zeros((0,), np.int32), 259)
  with pytest.raises(tk.TokenIdError, match=r"sft.jsonl:3 prompt: token id 259 at index 2"):
    tk.check_token_ids([3, 4, 259], 259, where="sft.jsonl:3 prompt")
  with pytest.raises(tk.TokenIdError, match=r"token id -1 at index \(1, 0\)"):
    tk.check_token_ids(np.array([[1, 2], [-1, 3]]), 10)
  with pytest.raises(tk.TokenIdError, match="integers"):
    tk.check_token_ids([1.5], 10)


def test_chat_template_default_and_custom():
  messages = [
      {"role": "system", "content": "be brief"},
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"},]
  tok = tk.ByteTokenizer()
  assert tok.apply_chat_template(
      messages) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello\n"
  assert tok.apply_chat_template(
      messages[:2], add_generation_prompt=True).endswith("<|user|>\nhi\n<|assistant|>\n")
  custom = tk.ChatTemplate(
      message_format="{role}: {content}\n",
      generation_prompt="assistant:",
      role_formats=(("system", "[{content}]\n"),),
  )
  tok = tk.ByteTokenizer(chat_template=custom)
  assert tok.apply_chat_template(
      messages,
      add_generation_prompt=True) == ("[be brief]\nuser: hi\nassistant: hello\nassistant:")
  with pytest.raises(ValueError, match=r"messages\[0\].role='robot'"):
    tok.apply_chat_template([{"role": "robot", "content": "x"}])
  with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
    tok.apply_chat_template([{"role": "user", "content": 3}])
  with pytest.raises(ValueError, match="message_format"):
    tk.ChatTemplate(message_format="{role} only")
  with pytest.raises(ValueError, match="not a valid format"):
    tk.ChatTemplate(message_format="{content} {speaker}")


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers, trainers, decoders

  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  corpus = ["the cat sat on the mat", "a dog ran in the park", "emoji 😀 and 日本語"] * 20
  tok.train_from_iterator(corpus, trainer=trainer)
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer(hf_path, tmp_path):
  tok = tk.load_tokenizer(hf_path)
  assert isinstance(tok, tk.HFTokenizer) and isinstance(tok, tk.Tokenizer)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in UNICODE_TEXTS:
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no specials
    tk.check_token_ids(ids, tok.vocab_size)
    assert tok.decode(ids) == text
  batch = tok.encode_batch(UNICODE_TEXTS)
  assert batch == [tok.encode(t) for t in UNICODE_TEXTS]
  assert tok.decode_batch(batch) == UNICODE_TEXTS
  assert tok.decode([tok.bos_id] + tok.encode("the cat") + [tok.eos_id]) == "the cat"
  # Specials by explicit string; an unknown one is an error naming it.
  tok2 = tk.HFTokenizer(hf_path, bos_token="</s>", eos_token="</s>", pad_token="<unk>")
  assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (2, 2, 3)
  assert tok2.fingerprint() != tok.fingerprint()
  with pytest.raises(ValueError, match="eos_token='<nope>'"):
    tk.HFTokenizer(hf_path, eos_token="<nope>")
  # Same file -> same fingerprint; a changed file -> a different one.
  assert tk.load_tokenizer("hf:" + hf_path).fingerprint() == tok.fingerprint()
  assert tok.fingerprint().startswith(f"hf-v{tok.vocab_size}-")
  edited = tmp_path / "tokenizer.json"
  edited.write_text(open(hf_path).read() + "\n")  # same vocabulary, different file
  assert tk.HFTokenizer(str(edited)).fingerprint() != tok.fingerprint()


def test_sentencepiece_tokenizer(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  lines = ["the cat sat on the mat", "a dog ran in the park", "emoji 😀 and 日本語 café"] * 30
  corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(
      input=str(corpus),
      model_prefix=str(prefix),
      vocab_size=320,
      model_type="unigram",
      hard_vocab_limit=False,
      byte_fallback=True,
      character_coverage=1.0,
      pad_id=3,
      minloglevel=2,
  )
  tok = tk.load_tokenizer(str(prefix) + ".model")
  assert isinstance(tok, tk.SentencePieceTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  for text in ["the cat sat on the mat", "emoji 😀 and 日本語", "unseen ü 字"]:
    ids = tok.encode(text)
    tk.check_token_ids(ids, tok.vocab_size)
    assert tok.decode(ids) == text
  assert tok.decode_batch(tok.encode_batch(["a dog", "the park"])) == ["a dog", "the park"]
  assert tok.fingerprint().startswith("sentencepiece-v")
  assert tok.fingerprint() != tk.ByteTokenizer().fingerprint()


def test_load_tokenizer_specs():
  assert isinstance(tk.load_tokenizer(), tk.ByteTokenizer)
  assert isinstance(tk.load_tokenizer("byte"), tk.ByteTokenizer)
  byte = tk.ByteTokenizer()
  assert tk.load_tokenizer(byte) is byte
  assert byte.fingerprint() == tk.ByteTokenizer().fingerprint()
  with pytest.raises(ValueError, match="unknown spec 'gpt9'"):
    tk.load_tokenizer("gpt9")
  with pytest.raises(FileNotFoundError):
    tk.load_tokenizer("hf:/does/not/exist.json")
