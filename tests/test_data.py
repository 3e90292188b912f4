import json

import pytest
import torch

from ringada.data import SHAKESPEARE_EVAL, Batch, load_dataset, pack, polarity_examples, shakespeare_files


def _lines(path):
    return [json.loads(l)["input_ids"] for l in path.read_text().splitlines()]


def test_packing_keeps_file_order_exactly(token_jsonl):
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=16)
    stream = [t for row in _lines(token_jsonl) for t in row]
    assert len(ds) == len(stream) // 16
    assert ds.input_ids.flatten().tolist() == stream[:len(ds) * 16]
    _, batch = ds.batch_at(0, 4, shuffle=False, seed=0)
    assert batch.input_ids.flatten().tolist() == stream[:64]
    # the next step continues exactly where the previous one stopped; epochs wrap around
    _, nxt = ds.batch_at(1, 4, shuffle=False, seed=0)
    assert nxt.input_ids.flatten().tolist() == stream[64:128]
    epoch, wrapped = ds.batch_at(ds.batches_per_epoch(4), 4, shuffle=False, seed=0)
    assert epoch == 1 and torch.equal(wrapped.input_ids, batch.input_ids)


def test_shuffle_is_seeded_and_a_permutation_per_epoch(token_jsonl):
    ds = load_dataset(str(token_jsonl), "train", task="causal_lm", seq_len=8)
    per_epoch = ds.batches_per_epoch(5)
    a = [ds.batch_at(s, 5, shuffle=True, seed=3)[1].input_ids for s in range(per_epoch)]
    b = [ds.batch_at(s, 5, shuffle=True, seed=3)[1].input_ids for s in range(per_epoch)]
    c = [ds.batch_at(s, 5, shuffle=True, seed=4)[1].input_ids for s in range(per_epoch)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    rows = sorted(map(tuple, torch.cat(a).tolist()))
    assert rows == sorted(map(tuple, ds.input_ids[:len(rows)].tolist())) or len(set(rows)) == len(rows)
    assert len(rows) == per_epoch * 5 and len(set(rows)) == len(rows)  # no row twice within an epoch


def test_micro_batch_split_and_counts():
    ids = torch.arange(5 * 6).view(5, 6)
    labels = ids.clone()
    labels[0, 3:] = -100
    batch = Batch(ids, labels)
    parts = batch.split(3)
    assert [p.size for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p.input_ids for p in parts]), ids)
    assert batch.count() == 5 * 5 - 3 == sum(p.count() for p in parts)
    cls = Batch(ids, torch.tensor([0, 1, 1, 0, 1]), torch.ones_like(ids))
    assert cls.count() == 5 and [p.count() for p in cls.split(2)] == [3, 2]


def test_classification_jsonl_pads_and_masks(tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"input_ids": [5, 6, 7], "label": 1}, {"input_ids": list(range(1, 20)), "label": 0}]) + "\n")
    ds = load_dataset(str(path), "train", task="classification", seq_len=8, num_labels=2)
    assert ds.input_ids[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert ds.attention_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ds.input_ids[1].tolist() == list(range(1, 9)) and ds.attention_mask[1].sum() == 8
    assert ds.labels.tolist() == [1, 0]


@pytest.mark.parametrize("rows, match", [
    ([{"input_ids": [1, 2], "label": 2}], r"label 2; expected an integer in \[0, 2\)"),
    ([{"input_ids": [1, 2]}], "label None"),
    ([{"input_ids": [1, -2], "label": 0}], "non-negative integers"),
    ([{"words": "x"}], "'text' or 'input_ids'"),
])
def test_bad_jsonl_rows_are_rejected(tmp_path, rows, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=match):
        load_dataset(str(path), "train", task="classification", seq_len=8, num_labels=2)


def test_text_needs_a_tokenizer_and_short_data_is_rejected(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("some words")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_dataset(str(txt), "train", task="causal_lm", seq_len=8)
    with pytest.raises(ValueError, match="less than one sequence"):
        pack([[1, 2, 3]], 8, "tiny")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "none.jsonl"), "train", task="causal_lm", seq_len=8)


def test_builtin_splits_are_disjoint_and_fixed():
    train, held = shakespeare_files("train"), shakespeare_files("eval")
    assert {p.name for p in held} == set(SHAKESPEARE_EVAL)
    assert len(train) + len(held) == 42 and not {p.name for p in train} & {p.name for p in held}
    assert all(not p.name.endswith("_gut_f.txt") for p in train)
    tr, ev = polarity_examples("train"), polarity_examples("eval")
    assert (len(tr), len(ev)) == (160, 40)
    assert {r["label"] for r in tr} == {0, 1}
    assert not {r["text"] for r in tr} & {r["text"] for r in ev}


def test_eval_batches_spread_over_the_set(token_jsonl):
    ds = load_dataset(str(token_jsonl), "eval", task="causal_lm", seq_len=8)
    full = ds.eval_batches(4, 0)
    assert sum(b.size for b in full) == len(ds)
    few = ds.eval_batches(4, 2)
    assert [b.size for b in few] == [4, 4]
    assert torch.equal(few[0].input_ids[0], ds.input_ids[0]) and torch.equal(few[-1].input_ids[-1], ds.input_ids[-1])


@pytest.mark.parametrize("name", ["bad.txt", "bad.jsonl"])
def test_non_utf8_file_names_key_file_and_byte(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"ok\n\xff\xfe not utf-8\n")
    with pytest.raises(ValueError) as err:
        load_dataset(str(path), "eval", task="causal_lm", seq_len=8)
    assert str(err.value) == f"data.eval: {path}: not UTF-8 text at byte 3; save it as UTF-8"


def test_bad_json_names_key_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input_ids": [1, 2]}\n\n{"input_ids": [3,\n')
    with pytest.raises(ValueError) as err:
        load_dataset(str(path), "train", task="causal_lm", seq_len=8)
    assert str(err.value).startswith(f"data.train: {path}:3: not valid JSON (")


def test_directory_and_unreadable_files_name_key_and_file(tmp_path, monkeypatch):
    folder = tmp_path / "corpus.txt"
    folder.mkdir()
    with pytest.raises(ValueError) as err:
        load_dataset(str(folder), "train", task="causal_lm", seq_len=8)
    assert str(err.value) == f"data.train: {folder}: is a directory; expected a .txt or .jsonl file"
    path = tmp_path / "locked.jsonl"
    path.write_text('{"input_ids": [1]}\n')

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_bytes", refuse)  # root reads even a chmod 000 file
    with pytest.raises(ValueError) as err:
        load_dataset(str(path), "eval", task="causal_lm", seq_len=8)
    assert str(err.value) == f"data.eval: {path}: cannot be read (Permission denied)"
