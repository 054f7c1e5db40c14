"""JSONL record readers: every shape parses, and every validation error names file, line and field."""

import json

import pytest

from rlhf_jax.data import records as rec
from rlhf_jax.data.tokenizers import ChatTemplate


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n",
                  encoding="utf-8")
  return str(path)


def test_parse_every_kind(tmp_path):
  sft = _write(tmp_path,
               [{"prompt": "p", "response": "r", "id": 7}, "", {"prompt": "", "response": "é😀"}])
  assert rec.read_records(sft, "sft") == [rec.SFTRecord("p", "r"), rec.SFTRecord("", "é😀")]

  prompts = _write(tmp_path, [{"prompt": "p"}, {"messages": [{"role": "user", "content": "hi"}]}],
                   "prompts.jsonl")
  assert rec.read_records(prompts, "prompt") == [
      rec.PromptRecord("p"),
      rec.PromptRecord("<|user|>\nhi\n<|assistant|>\n")]

  pw = _write(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
  assert rec.read_records(pw, "pairwise") == [rec.PairwiseRecord("p", "a", "b")]

  ranked = _write(tmp_path, [
      {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.5, -1, 2]},
      {"prompt": "p", "responses": ["a", "b"], "ranks": [2, 1]},])
  r1, r2 = rec.read_records(ranked, "ranked")
  assert r1 == rec.RankedRecord("p", ("a", "b", "c"), (0.5, -1.0, 2.0))
  assert r2.scores == (-2.0, -1.0)  # rank 1 (best) gets the higher score

  rated = _write(tmp_path, [{"prompt": "p", "response": "r", "rating": 7}])
  assert rec.read_records(rated, "rated", scale=(1, 7)) == [rec.RatedRecord("p", "r", 7.0)]

  attrs = _write(tmp_path,
                 [{"prompt": "p", "response": "r", "attributes": {"harmless": 1, "helpful": 0.5}}])
  (a,) = rec.read_records(attrs, "attributes", attribute_names=["helpful", "harmless"],
                          scale=(0, 1))
  assert a.attribute("helpful") == 0.5 and a.attributes == (("harmless", 1.0), ("helpful", 0.5))


def test_chat_messages(tmp_path):
  template = ChatTemplate()
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  path = _write(tmp_path, [{"messages": msgs}, {"messages": msgs[:1], "response": "yo"}])
  r1, r2 = rec.read_records(path, "sft")
  assert r1 == rec.SFTRecord("<|user|>\nhi\n<|assistant|>\n", "hello")
  assert r2 == rec.SFTRecord("<|user|>\nhi\n<|assistant|>\n", "yo")
  pw = _write(tmp_path, [{"messages": msgs, "chosen": "a", "rejected": "b"}], "pw.jsonl")
  (p,) = rec.read_records(pw, "pairwise", chat_template=template)
  assert p.prompt == template.render(msgs, add_generation_prompt=True)

  bad = _write(tmp_path, [{"messages": msgs[:1]}], "bad.jsonl")
  with pytest.raises(rec.RecordError,
                     match=r"bad.jsonl:1: field 'messages\[0\]': expected the last message"):
    rec.read_records(bad, "sft")
  bad = _write(tmp_path,
               [{"messages": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}],
               "bad2.jsonl")
  with pytest.raises(rec.RecordError, match=r"bad2.jsonl:1: field 'messages'.*role='robot'"):
    rec.read_records(bad, "pairwise")


ERROR_CASES = [
    # (kind, line, kwargs, regex on the message)
    ("prompt", {"text": "p"}, {}, r":2: field 'prompt': expected a string \(or a 'messages' list\)"
    ),
    ("sft", '{"prompt": "p", "response": "r"', {}, r":2: expected valid JSON"),
    ("sft", "[1, 2]", {}, r":2: expected a JSON object per line, got list"),
    ("sft", {"prompt": "p"}, {},
     r":2: field 'response': expected a value \(the field is missing\)"),
    ("sft", {"response": "r"}, {},
     r":2: field 'prompt': expected a string \(or a 'messages' list\)"),
    ("sft", {"prompt": 3,
             "response": "r"}, {}, r":2: field 'prompt': expected a string, got int 3"),
    ("sft", {"prompt": "p",
             "response": "  "}, {}, r":2: field 'response': expected a non-empty string"),
    ("pairwise", {"prompt": "p", "chosen": "a"}, {}, r":2: field 'rejected': expected a value"),
    ("pairwise", {"prompt": "p", "chosen": "",
                  "rejected": "b"}, {}, r":2: field 'chosen': expected a non-empty string"),
    ("pairwise", {"prompt": "p", "chosen": ["a"],
                  "rejected": "b"}, {}, r":2: field 'chosen': expected a string, got list"),
    ("ranked", {"prompt": "p", "responses": ["a"], "scores": [1]}, {},
     r":2: field 'responses': expected at least 2 responses to rank, got 1"),
    ("ranked", {"prompt": "p", "responses": "ab",
                "scores": [1]}, {}, r":2: field 'responses': expected a list of strings"),
    ("ranked", {"prompt": "p", "responses": ["a", ""],
                "scores": [1, 2]}, {}, r":2: field 'responses\[1\]': expected a non-empty string"),
    ("ranked", {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]}, {},
     r":2: field 'scores': expected 3 entries, one per response, got 2"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"],
                "ranks": [1, 2, 3]}, {}, r":2: field 'ranks': expected 2 entries"),
    ('ranked', '{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}', {},
     r":2: field 'scores\[1\]': expected a finite number, got nan"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, None]}, {},
     r":2: field 'scores\[1\]': expected a number \(it is missing / null\)"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"],
                "scores": [1, "2"]}, {}, r":2: field 'scores\[1\]': expected a number, got str"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"]}, {},
     r":2: field 'scores': expected exactly one of 'scores'.*got neither"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2],
                "ranks": [1, 2]}, {}, r":2: field 'scores'.*got both"),
    ("ranked", {"prompt": "p", "responses": ["a", "b"],
                "ranks": [1, 0]}, {}, r":2: field 'ranks\[1\]': expected an integer >= 1"),
    ("rated", {"prompt": "p", "response": "r", "rating": 8}, {"scale": (1, 7)},
     r":2: field 'rating': expected a rating within the declared scale \[1.0, 7.0\], got 8"),
    ("rated", {"prompt": "p",
               "response": "r"}, {"scale": (1, 7)}, r":2: field 'rating': expected a value"),
    ("rated", {"prompt": "p", "response": "r",
               "rating": True}, {}, r":2: field 'rating': expected a number, got bool"),
    ('rated', '{"prompt": "p", "response": "r", "rating": Infinity}', {},
     r":2: field 'rating': expected a finite number"),
    ("attributes", {"prompt": "p", "response": "r",
                    "attributes": {}}, {}, r":2: field 'attributes': expected a non-empty object"),
    ("attributes", {"prompt": "p", "response": "r",
                    "attributes": {"helpful": 1}}, {"attribute_names": ["helpful", "harmless"]},
     r":2: field 'attributes.harmless': expected a value for every attribute"),
    ("attributes", {"prompt": "p", "response": "r", "attributes": {"helpful": float("nan")}}, {},
     r":2: field 'attributes.helpful': expected a finite number"),
    ("attributes", {"prompt": "p", "response": "r",
                    "attributes": {"helpful": 3}}, {"scale": (0, 1)},
     r":2: field 'attributes.helpful': expected a value within the declared scale"),]


@pytest.mark.parametrize("kind,line,kwargs,pattern", ERROR_CASES)
def test_record_errors_name_file_line_field(tmp_path, kind, line, kwargs, pattern):
  good = {
      "prompt": {"prompt": "p"},
      "sft": {"prompt": "p", "response": "r"},
      "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
      "ranked": {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]},
      "rated": {"prompt": "p", "response": "r", "rating": 1},
      "attributes": {"prompt": "p", "response": "r", "attributes": {"helpful": 1, "harmless": 0}},
  }[kind]
  path = _write(tmp_path, [good, line, good], name="my_file.jsonl")
  with pytest.raises(rec.RecordError, match="my_file.jsonl" + pattern) as info:
    rec.read_records(path, kind, **kwargs)
  assert info.value.line == 2 and info.value.path == path


def test_option_and_empty_file_errors(tmp_path):
  path = _write(tmp_path, [{"prompt": "p", "response": "r"}])
  with pytest.raises(ValueError, match=r"kind='dpo'; expected one of"):
    rec.read_records(path, "dpo")
  with pytest.raises(ValueError, match=r"scale=\(7, 1\)"):
    rec.read_records(path, "rated", scale=(7, 1))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(rec.RecordError, match="empty.jsonl:0: expected at least one sft record"):
    rec.read_records(str(empty), "sft")


def test_write_jsonl_roundtrip(tmp_path):
  rows = [
      rec.AttributeRecord("p", "r", (("a", 1.0),)),
      {"prompt": "q", "response": "s", "attributes": {"a": 0.0}}]
  path = str(tmp_path / "out.jsonl")
  assert rec.write_jsonl(path, rows) == 2
  assert [r.attribute("a") for r in rec.read_records(path, "attributes")] == [1.0, 0.0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind
  with pytest.raises(ValueError):
    rec.write_jsonl(str(tmp_path / "nan.jsonl"), [{"x": float("nan")}])
