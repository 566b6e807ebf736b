import json

import pytest
import torch

from edge_runtime.data.dataset import (DataError, OwnerData, Record, common_prefix_length, encode_record,
                                      pad_records, read_records, scored_share)
from edge_runtime.models.stage import IGNORE_INDEX
from edge_runtime.models.tokenizer import ByteTokenizer


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_tokens_are_not_scored():
    ids, labels = encode_record(Record("ab", "cd"), ByteTokenizer(), 16)
    assert ids == [97, 98, 99, 100, ByteTokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 99, 100, ByteTokenizer.eos_token_id]


def test_scored_share_counts_the_completion_tokens_of_the_padded_sequences():
    # "ab" -> "cd": the loss scores c, d and eos: 3 of 2 x 8 positions over the two records
    records = [Record("ab", "cd"), Record("", "x")]  # no prompt: x and eos, the first token is never scored
    assert scored_share(records, ByteTokenizer(), 8) == (3 + 1) / 16


def test_long_prompt_is_cut_from_the_left_so_the_completion_survives():
    ids, labels = encode_record(Record("0123456789", "ab"), ByteTokenizer(), 6)
    assert ByteTokenizer().decode(ids) == "789ab"
    assert labels[-3:] == [97, 98, ByteTokenizer.eos_token_id]


@pytest.mark.parametrize("seq_len", [13, 14, 20, 21, 40])
def test_a_prompt_that_fits_is_kept_whole(seq_len):
    # the room left after the completion is more than the prompt but less than twice it at 13..20
    ids, _ = encode_record(Record("0123456789", "ab"), ByteTokenizer(), seq_len)
    assert ByteTokenizer().decode(ids) == "0123456789ab"


def test_hidden_labels_feed_the_prompt_alone_and_score_its_one_token_completion_after_it():
    ids, labels = encode_record(Record("abcdef", "+"), ByteTokenizer(), 5, hide_labels=True)
    assert ByteTokenizer().decode(ids) == "cdef"  # cut from the left to leave room for the label
    assert labels == [IGNORE_INDEX] * 4 + [ord("+")]  # scored at the prompt's last position; no end-of-text
    assert encode_record(Record("", "plain"), ByteTokenizer(), 8, hide_labels=True) == \
        encode_record(Record("", "plain"), ByteTokenizer(), 8)  # plain text: every token is input and target
    with pytest.raises(DataError, match=r"completion ' positive' is 9 tokens: .* must be one token"):
        encode_record(Record("Tweet: x", " positive"), ByteTokenizer(), 32, hide_labels=True)


@pytest.mark.parametrize("to_longest", [False, True])
def test_hidden_labels_pad_after_the_prompt_and_batches_count_fed_tokens(to_longest):
    records = [Record("ab", "+"), Record("0123456789", "-")]
    ids, labels, lengths = pad_records(records, ByteTokenizer(), 8, to_longest=to_longest, hide_labels=True)
    assert ids.shape == labels.shape == (2, 8) and lengths.tolist() == [2, 7]
    assert ids[0, 2:].eq(ByteTokenizer.pad_token_id).all() and labels[0, 2] == ord("+")
    assert labels[1, 7] == ord("-") and (labels[:, 1:] != IGNORE_INDEX).sum() == 2
    assert pad_records(records[:1], ByteTokenizer(), 8, to_longest=True, hide_labels=True)[1].shape == (1, 3)


@pytest.mark.parametrize("to_longest", [False, True])
def test_records_are_right_padded_with_their_lengths(to_longest):
    tokenizer = ByteTokenizer()
    records = [Record("ab", "c"), Record("", "defg"), Record("0123456789", "x")]
    ids, labels, lengths = pad_records(records, tokenizer, 8, to_longest=to_longest)
    assert ids.shape == labels.shape == (3, 8)  # the longest record fills seq_len here
    assert lengths.tolist() == [4, 5, 8]
    for row, record in enumerate(records):
        token_ids, token_labels = encode_record(record, tokenizer, 8)
        assert ids[row, :lengths[row]].tolist() == token_ids and labels[row, :lengths[row]].tolist() == token_labels
        assert (ids[row, lengths[row]:] == tokenizer.pad_token_id).all()
        assert (labels[row, lengths[row]:] == IGNORE_INDEX).all()
    assert pad_records(records[:1], tokenizer, 8, to_longest=True)[0].shape == (1, 4)


def test_common_prefix_length():
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3]]) == 2  # a shorter sequence bounds it
    assert common_prefix_length([[5, 1], [6, 1]]) == 0


def test_a_prompt_cut_from_the_left_shortens_the_common_prefix():
    tokenizer = ByteTokenizer()
    records = [Record("Tweet: short\nSentiment:", " positive"), Record("Tweet: much longer\nSentiment:", " negative")]
    ids = lambda seq_len: [encode_record(r, tokenizer, seq_len)[0] for r in records]
    assert common_prefix_length(ids(64)) == len("Tweet: ")
    assert common_prefix_length(ids(32)) == 0  # the longer prompt lost its template


@pytest.mark.parametrize("line, message", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    (json.dumps({"txt": "x"}), r"data.jsonl:2: expected an object with a non-empty 'text'"),
    (json.dumps({"prompt": "x"}), r"data.jsonl:2: expected"),
    (json.dumps(["text"]), r"data.jsonl:2: expected"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="has no records"):
        read_records(write_lines(tmp_path / "empty.jsonl", [""]))


def test_batches_are_deterministic_padded_and_cover_each_epoch(text_data):
    records = read_records(text_data)
    data = OwnerData(records, ByteTokenizer(), micro_batch_size=4, seq_len=20, micro_batches=3, seed=7)
    again = OwnerData(records, ByteTokenizer(), micro_batch_size=4, seq_len=20, micro_batches=3, seed=7)
    first = data.step_batch(0)
    assert all(torch.equal(a, b) for a, b in zip(first.input_ids, again.step_batch(0).input_ids))
    assert [tuple(t.shape) for t in first.input_ids] == [(4, 20)] * 3
    pads = first.input_ids[0] == ByteTokenizer.pad_token_id
    assert (first.labels[0][pads] == IGNORE_INDEX).all()
    epoch = torch.cat([t for s in range(4) for t in data.step_batch(s).input_ids])  # 48 rows = one epoch
    assert len({tuple(row.tolist()) for row in epoch}) == len({tuple(r.tolist()) for r in data._ids})
