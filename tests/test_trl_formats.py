"""TRL's dataset formats (standard and conversational; prompt-completion, preference with explicit or
implicit prompt, unpaired preference) read from JSON Lines and Parquet into the record kinds.

The conversational cases are checked against TRL's own rule, computed here with transformers on the
same tokenizer directory: TRL's ``apply_chat_template`` (huggingface/trl, commit
00cc012a666746bd34df2caddae86912287a48e9, ``trl/data_utils.py``) renders the prompt with
``add_generation_prompt=True`` and takes the completion as ``render(prompt + completion)[len(prompt):]``.
The implicit-prompt split is TRL's ``extract_prompt`` from the same file, transcribed below.
"""

import json

import numpy as np
import pytest

from rlhf_jax.data import dataset as ds
from rlhf_jax.data import formats
from rlhf_jax.data import records as rec
from rlhf_jax.data import tokenizers as tk

from test_hf_tokenizer import write_hf_tokenizer

transformers = pytest.importorskip("transformers")


def trl_extract_prompt(example):
  """TRL's ``extract_prompt`` (trl/data_utils.py at 00cc012a), transcribed line by line."""
  for idx in range(min(len(example["chosen"]), len(example["rejected"]))):
    if example["chosen"][idx] != example["rejected"][idx]:
      if example["chosen"][idx - 1] == " ":  # remove space before the prompt
        idx -= 1
      break
  return {
      "prompt": example["chosen"][:idx],
      "chosen": example["chosen"][idx:],
      "rejected": example["rejected"][idx:],}


def trl_apply_chat_template(example, hf):
  """TRL's ``apply_chat_template`` for the prompt / completion cases (same file), with
  transformers' tokenizer as TRL calls it."""
  out = {}
  if "prompt" in example:
    last_role = example["prompt"][-1]["role"]
    prompt = hf.apply_chat_template(example["prompt"], tokenize=False,
                                    add_generation_prompt=last_role == "user",
                                    continue_final_message=last_role == "assistant")
    out["prompt"] = prompt
    for key in ("chosen", "rejected", "completion"):
      if key in example:
        full = hf.apply_chat_template(example["prompt"] + example[key], tokenize=False)
        assert full.startswith(prompt)
        out[key] = full[len(prompt):]
  if "messages" in example:
    out["text"] = hf.apply_chat_template(example["messages"], tokenize=False)
  return out


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


@pytest.fixture(scope="module", params=["qwen2", "gemma", "llama3"])
def chat_tok(request, tmp_path_factory):
  path = write_hf_tokenizer(tmp_path_factory.mktemp(request.param), request.param)
  return request.param, tk.load_tokenizer("hf:" +
                                          path), transformers.AutoTokenizer.from_pretrained(path)


PROMPT = [{"role": "user", "content": "What is 2+2?"}]
CHOSEN = [{"role": "assistant", "content": "4"}]
REJECTED = [{"role": "assistant", "content": "the cat"}]


def _strip(text, token):
  return text[len(token):] if token and text.startswith(token) else text


def _strip_eos(text, eos):
  stripped = text.rstrip()
  return stripped[:-len(eos)] if eos and stripped.endswith(eos) else text


@pytest.mark.parametrize("implicit", [False, True])
def test_conversational_preference_like_trl(chat_tok, tmp_path, implicit):
  family, tok, hf = chat_tok
  row = ({"chosen": PROMPT + CHOSEN, "rejected": PROMPT + REJECTED} if implicit else {
      "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
  path = _write_jsonl(tmp_path / "pw.jsonl", [row])
  (record,) = rec.read_records(path, "pairwise", chat_template=tok.chat_template)
  example = trl_extract_prompt(row) if implicit else row
  want = trl_apply_chat_template(example, hf)
  bos, eos = hf.bos_token or "", hf.eos_token
  assert record.prompt == _strip(want["prompt"], bos)
  assert record.chosen == _strip_eos(want["chosen"], eos)
  assert record.rejected == _strip_eos(want["rejected"], eos)
  # The dataset's ids: [BOS] prompt chosen [EOS] = transformers' ids of the whole conversation
  # (the template's final EOS written once, as an id).
  data = ds.prepare_dataset(path, "pairwise", tok, str(tmp_path / "ds"), max_prompt_len=200,
                            max_response_len=100)
  ex = data[0]
  ours = [tok.bos_id] + ex["prompt"].tolist() + ex["chosen"].tolist() + [tok.eos_id]
  full = hf.apply_chat_template(PROMPT + CHOSEN, tokenize=True, return_dict=False)
  full_text = hf.apply_chat_template(PROMPT + CHOSEN, tokenize=False)
  if family == "qwen2":  # no BOS token: generation_config's <|endoftext|> leads; "\n" after EOS
    assert full_text.endswith("<|im_end|>\n")
    assert ours[1:] == list(full)[:-1] and ours[0] == tok.bos_id
  elif family == "llama3":  # <|eot_id|> is EOS: the rendered end of turn
    assert ours == list(full)
  else:  # gemma: <end_of_turn>\n stays in the text, <eos> follows
    assert ours == list(full) + [tok.eos_id]


def test_conversational_sft_and_unpaired_like_trl(chat_tok, tmp_path):
  family, tok, hf = chat_tok
  bos, eos = hf.bos_token or "", hf.eos_token
  rows = [{"prompt": PROMPT, "completion": CHOSEN}, {"messages": PROMPT + CHOSEN}]
  (pc, msgs) = rec.read_records(_write_jsonl(tmp_path / "sft.jsonl", rows), "sft",
                                chat_template=tok.chat_template)
  want = trl_apply_chat_template(rows[0], hf)
  assert pc == rec.SFTRecord(_strip(want["prompt"], bos), _strip_eos(want["completion"], eos))
  assert msgs == pc  # a messages list ending with the assistant turn: the same split
  rows = [{"prompt": PROMPT, "completion": CHOSEN, "label": True},
          {"prompt": PROMPT, "completion": REJECTED, "label": False}]
  got = rec.read_records(_write_jsonl(tmp_path / "kto.jsonl", rows), "unpaired",
                         chat_template=tok.chat_template)
  assert [(r.completion, r.label) for r in got] == [
      (pc.response, True),
      (_strip_eos(trl_apply_chat_template(rows[1], hf)["completion"], eos), False)]
  assert got[0].prompt == pc.prompt
  # A prompt ending with an assistant turn is continued (TRL: continue_final_message).
  if family != "gemma":  # Gemma's template trims content; covered in test_hf_tokenizer
    partial = PROMPT + [{"role": "assistant", "content": "It is"}]
    (p,) = rec.read_records(_write_jsonl(tmp_path / "p.jsonl", [{"prompt": partial}]), "prompt",
                            chat_template=tok.chat_template)
    assert p.prompt == _strip(trl_apply_chat_template({"prompt": partial}, hf)["prompt"], bos)


def test_standard_formats(tmp_path):
  rows = [{"prompt": "The sky is", "completion": " blue."}, {"text": "The sky is blue."}]
  pc, text = rec.read_records(_write_jsonl(tmp_path / "sft.jsonl", rows), "sft")
  assert pc == rec.SFTRecord("The sky is", " blue.")
  assert text == rec.SFTRecord("", "The sky is blue.")
  rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
          {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]
  implicit, explicit = rec.read_records(_write_jsonl(tmp_path / "pw.jsonl", rows), "pairwise")
  assert implicit == rec.PairwiseRecord("The sky is", " blue.", " green.") == explicit
  rows = [{"prompt": "The sky is", "completion": " blue.", "label": True}]
  (u,) = rec.read_records(_write_jsonl(tmp_path / "u.jsonl", rows), "unpaired")
  assert (u.prompt, u.completion, u.label) == ("The sky is", " blue.", True)
  # Prompts of an implicit-prompt file (read_prompts reads any file as kind 'prompt').
  (p,) = rec.read_records(_write_jsonl(tmp_path / "ip.jsonl", rows[:1] * 1), "prompt")
  assert p.prompt == "The sky is"


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        ("The sky is blue.", "The sky is green."),
        ("Answer: yes", "Answer: no"),
        ("abc", "abcd"),  # one a prefix of the other: TRL splits at the shorter one's last index
        ("same", "same"),
        ("x y", "x z"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], [{
            "role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]),])
def test_extract_prompt_equals_trl(chosen, rejected):
  want = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
  assert formats.extract_prompt(chosen,
                                rejected) == (want["prompt"], want["chosen"], want["rejected"])


def test_extract_prompt_first_item_differs():
  # TRL reads chosen[-1] here (idx - 1 = -1): a chosen ending with a space would move the split to
  # its last character. The prompt is empty instead.
  assert formats.extract_prompt("a ", "b") == ("", "a ", "b")
  assert trl_extract_prompt({"chosen": "a ", "rejected": "b"})["prompt"] == "a"


def test_ranked_and_rated_conversational(tmp_path):
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "q", "qwen2"))
  rows = [{"prompt": PROMPT, "responses": [CHOSEN, REJECTED, "plain"], "scores": [1, 0, 2]}]
  (r,) = rec.read_records(_write_jsonl(tmp_path / "r.jsonl", rows), "ranked",
                          chat_template=tok.chat_template)
  assert r.responses == ("4", "the cat", "plain")
  assert r.prompt.endswith("<|im_start|>assistant\n")
  rows = [{"prompt": PROMPT, "response": CHOSEN, "rating": 3}]
  (x,) = rec.read_records(_write_jsonl(tmp_path / "x.jsonl", rows), "rated",
                          chat_template=tok.chat_template)
  assert (x.prompt, x.response) == (r.prompt, "4")


def test_legacy_records_unchanged(tmp_path):
  """With the built-in template, records valid before normalise to what they parsed to before."""
  template = tk.ChatTemplate()
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  rows = [{"messages": msgs}, {"messages": msgs[1:]}, {"prompt": "p", "response": "r"}]
  got = rec.read_records(_write_jsonl(tmp_path / "s.jsonl", rows), "sft")
  assert got == [
      rec.SFTRecord(template.render(msgs[:1], True), "hello"),
      rec.SFTRecord(template.generation_prompt, "hello"),
      rec.SFTRecord("p", "r")]


def _parquet(path, rows):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def test_parquet_reads_like_jsonl(tmp_path):
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "q", "qwen2"))
  rows = [{"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
          {"prompt": PROMPT, "chosen": REJECTED, "rejected": CHOSEN}]
  pq_path = _parquet(tmp_path / "pw.parquet", rows)
  js_path = _write_jsonl(tmp_path / "pw.jsonl", rows)
  kw = dict(chat_template=tok.chat_template)
  assert rec.read_records(pq_path, "pairwise", **kw) == rec.read_records(js_path, "pairwise", **kw)
  rows = [{"prompt": "a", "completion": "b", "label": True},
          {"prompt": "c", "completion": "d", "label": False}]
  got = rec.read_records(_parquet(tmp_path / "u.parquet", rows), "unpaired")
  assert [(r.prompt, r.completion, r.label) for r in got] == [("a", "b", True), ("c", "d", False)]
  # A Parquet file goes through the dataset writer like a JSONL file.
  data = ds.prepare_dataset(pq_path, "pairwise", tok, str(tmp_path / "ds"), max_prompt_len=200,
                            max_response_len=50)
  assert len(data) == 2 and np.array_equal(data[0]["chosen"], data[1]["rejected"])


def test_parquet_errors_name_the_row(tmp_path):
  rows = [{"prompt": "a", "completion": "b", "label": True},
          {"prompt": "c", "completion": "", "label": False}]
  path = _parquet(tmp_path / "u.parquet", rows)
  with pytest.raises(rec.RecordError, match=r"u.parquet: row 1: field 'completion': expected a "
                     r"non-empty string"):
    rec.read_records(path, "unpaired")
  rows = [{"prompt": "a", "completion": "b", "label": 1}]
  with pytest.raises(rec.RecordError, match=r"l.parquet: row 0: field 'label': expected true or"):
    rec.read_records(_parquet(tmp_path / "l.parquet", rows), "unpaired")
  (tmp_path / "bad.parquet").write_bytes(b"not parquet")
  with pytest.raises(rec.RecordError, match=r"bad.parquet:0: expected a readable Parquet file"):
    rec.read_records(str(tmp_path / "bad.parquet"), "sft")


ERRORS = [
    ("pairwise", {"prompt": "p", "chosen": CHOSEN, "rejected": "b"},
     r":1: field 'chosen': expected a string: a conversational completion needs a conversational "
     r"'prompt'"),
    ("pairwise", {"chosen": PROMPT + CHOSEN,
                  "rejected": "x"}, r":1: field 'rejected': expected the same format as 'chosen'"),
    ("pairwise", {"chosen": CHOSEN, "rejected": REJECTED},
     r":1: field 'chosen': expected conversations sharing their first message"),
    ("pairwise", {"prompt": [{"role": "user", "content": 3}], "chosen": "a",
                  "rejected": "b"}, r":1: field 'prompt\[0\].content': expected a string"),
    ("pairwise", {"prompt": [{"content": "x"}], "chosen": "a",
                  "rejected": "b"}, r":1: field 'prompt\[0\].role': expected a role string"),
    ("sft", {"messages": [{"role": "user", "content": "q"}]},
     r":1: field 'messages\[0\]': expected the last message to have role 'assistant'"),
    ("sft", {"text": 5}, r":1: field 'text': expected a string"),
    ("sft", {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]},
     r":1: field 'messages': expected messages the chat template can render \(.*System role not "
     r"supported"),]


@pytest.mark.parametrize("kind,row,pattern", ERRORS)
def test_errors_name_file_line_field(tmp_path, kind, row, pattern):
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "g", "gemma"))
  path = _write_jsonl(tmp_path / "bad.jsonl", [row])
  with pytest.raises(rec.RecordError, match="bad.jsonl" + pattern):
    rec.read_records(path, kind, chat_template=tok.chat_template)
