"""Training config validation, data reading/formatting, response-only masking, metrics vs hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_train_fixtures import byte_tokenizer, write_jsonl

from slimtune.train.config import TrainConfig, apply_overrides, load_train_config
from slimtune.train.data import IGNORE, chat_example, collate, pack_texts, read_records, split_records, to_messages
from slimtune.train.errors import DataError, TrainConfigError
from slimtune.train.evaluate import accuracy, classify_generative, lm_loss, macro_f1


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, needle", [
    ({"trian": {}}, "Did you mean 'train'"),
    ({"train": {"lrr": 1e-3}}, "train.lrr: unknown key"),
    ({"train": {"lrr": 1e-3}}, "Did you mean 'lr'"),
    ({"data": {"taks": "causal_lm"}}, "Did you mean 'task'"),
    ({"train": {"lr": "fast"}}, "train.lr='fast': expected float"),
    ({"train": {"batch_size": 0}}, "train.batch_size=0: expected an int >= 1"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size=2.5: expected int"),
    ({"train": {"scheduler": "cosin"}}, "Did you mean 'cosine'"),
    ({"data": {"task": "clasification"}}, "Did you mean 'classification'"),
    ({"data": {"prompt": "no placeholder"}}, "data.prompt"),
    ({"method": {"method": "lora", "rr": 4}}, "Did you mean 'r'"),
    ({"method": {"method": "lorra"}}, "Did you mean 'lora'"),
])
def test_config_errors_name_the_key_and_the_fix(data, needle):
    with pytest.raises(TrainConfigError) as e:
        TrainConfig.from_dict(data)
    assert needle in str(e.value)


def test_config_yaml_numbers_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  max_steps: 5\ndata:\n  task: causal_lm\n  train: x.jsonl\n")
    cfg = load_train_config(path, ["train.lr=2e-4", "train.batch_size=3", "method.r=4", "data.labels=[a, b]"])
    assert cfg.train.lr == pytest.approx(2e-4)  # YAML reads 1e-3 as a string; we coerce
    assert cfg.train.batch_size == 3 and cfg.method["r"] == 4 and cfg.data.labels == ["a", "b"]
    with pytest.raises(TrainConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])


def test_config_round_trip(tmp_path):
    cfg = TrainConfig.from_dict({"train": {"max_steps": 3}, "output_dir": str(tmp_path / "r")})
    cfg.save(tmp_path / "c.yaml")
    assert load_train_config(tmp_path / "c.yaml") == cfg


# -- data reading ----------------------------------------------------------------------------------------
def test_read_jsonl_csv_and_folders(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "p"}, {"text": "y", "label": "n"}])
    (tmp_path / "a.csv").write_text("text,label\nhello,1\nworld,0\n")
    (tmp_path / "cls" / "pos").mkdir(parents=True)
    (tmp_path / "cls" / "neg").mkdir()
    (tmp_path / "cls" / "pos" / "1.txt").write_text("good")
    (tmp_path / "cls" / "neg" / "1.txt").write_text("bad")
    assert read_records(str(tmp_path / "a.jsonl"))[1] == {"text": "y", "label": "n"}
    assert read_records(str(tmp_path / "a.csv"))[0] == {"text": "hello", "label": "1"}
    assert sorted(r["label"] for r in read_records(str(tmp_path / "cls"))) == ["neg", "pos"]
    with pytest.raises(DataError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="Did you mean 'bbc_news'"):
        read_records("packaged:bbc_new")


def test_stratified_split_is_seeded_and_disjoint():
    cfg = TrainConfig.from_dict({"data": {"per_label_eval": 2, "seed": 1}}).data
    records = [{"text": str(i), "label": i % 3} for i in range(30)]
    train, held = split_records(records, cfg)
    assert sorted(r["label"] for r in held) == [0, 0, 1, 1, 2, 2]
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in held}) and len(train) == 24
    assert split_records(records, cfg) == (train, held)


def test_chat_layouts_become_the_same_messages():
    cfg = TrainConfig.from_dict({}).data
    alpaca = {"instruction": "Add", "input": "1+1", "output": "2"}
    messages = {"messages": [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Add\n\n1+1"}, {"from": "gpt", "value": "2"}]}
    assert to_messages(alpaca, cfg) == to_messages(messages, cfg) == to_messages(sharegpt, cfg)
    with pytest.raises(DataError, match="expected alpaca"):
        to_messages({"prompt": "x"}, cfg)


def test_response_only_loss_mask_on_a_chat_example():
    tok = byte_tokenizer()
    cfg = TrainConfig.from_dict({"data": {"task": "instruction", "max_length": 512}}).data
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    ex = chat_example(tok, msgs, cfg)
    assert len(ex["input_ids"]) == len(ex["labels"])
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    # exactly the two assistant turns (content, end-of-turn token and the template's newline after it)
    assert tok.decode(trained) == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    full = tok.decode(ex["input_ids"])
    assert full.startswith("<|im_start|>system\nBe brief.") and full.count("<|im_start|>assistant") == 2


def test_response_only_mask_without_a_chat_template():
    tok = byte_tokenizer(chat_template=False)
    cfg = TrainConfig.from_dict({"data": {"task": "instruction"}}).data
    ex = chat_example(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], cfg)
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(trained) == "A<|im_end|>\n"


def test_pack_texts_and_collate():
    tok = byte_tokenizer()
    blocks = pack_texts(["abcdef", "ghij"], tok, block=4)
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 4]  # 6 + 1 eos + 4 + 1 eos = 12 tokens
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE, IGNORE]]
    left = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_id=0, side="left")
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


# -- metrics vs hand-computed values ---------------------------------------------------------------------------
def test_accuracy_and_macro_f1_match_hand_values():
    preds, golds = [0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 0, 1]
    assert accuracy(preds, golds) == pytest.approx(4 / 6)
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(preds, golds, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a fixed function of the input ids (for scoring tests)."""

    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_lm_loss_matches_manual_cross_entropy():
    model = _FixedLogits()
    examples = [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    got = lm_loss(model, examples, pad_id=0)
    pairs = [(1, 2), (2, 3), (3, 4), (5, 6)]  # (input token, next token) at each labelled position
    terms = [F.cross_entropy(model.table[a][None], torch.tensor([b])).item() for a, b in pairs]
    assert got["tokens"] == 4 and got["loss"] == pytest.approx(sum(terms) / 4, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


def test_generative_scoring_first_token_and_full_answer_agree_with_hand_argmax():
    model = _FixedLogits()
    examples = [{"prompt_ids": [1, 2], "label": 0}, {"prompt_ids": [3], "label": 1}]
    candidates = [[4], [5], [6]]
    preds = classify_generative(model, examples, candidates, pad_id=0)
    assert preds == [int(model.table[2, [4, 5, 6]].argmax()), int(model.table[3, [4, 5, 6]].argmax())]
    shared = [[4, 5], [4, 6]]  # same first token: whole answers are scored by log-probability
    logp = model.table.log_softmax(-1)
    logp = logp.detach()
    expected = [int(torch.tensor([logp[2, 4] + logp[4, 5], logp[2, 4] + logp[4, 6]]).argmax()),
                int(torch.tensor([logp[3, 4] + logp[4, 5], logp[3, 4] + logp[4, 6]]).argmax())]
    assert classify_generative(model, examples, shared, pad_id=0) == expected
