import json
import re
from pydoc_data.topics import topics

import numpy as np
import pytest

from bdh_mlx.errors import DataError
from bdh_mlx.training.data import BatchSampler, eval_batches, load_corpus, looks_like_path


def test_file_is_memory_mapped_and_split_90_10(tmp_path):
    raw = bytes(range(256)) * 40
    (tmp_path / "c.bin").write_bytes(raw)
    corpus = load_corpus(tmp_path / "cache", data=str(tmp_path / "c.bin"))
    assert isinstance(corpus.train.base, np.memmap) or isinstance(corpus.train, np.memmap)
    n_train = int(len(raw) * 0.9)
    assert corpus.train.tobytes() == raw[:n_train] and corpus.val.tobytes() == raw[n_train:]
    assert not (tmp_path / "cache").exists()  # a single file is read in place


def test_folder_and_glob_concatenate_sorted_files_once(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"B" * 300)
    (folder / "a.txt").write_bytes(b"A" * 300)
    (folder / "sub" / "c.txt").write_bytes(b"C" * 300)
    (folder / ".hidden").write_bytes(b"H" * 300)
    cache = tmp_path / "cache"
    corpus = load_corpus(cache, data=str(folder), val_data=str(folder / "a.txt"))
    assert corpus.train.tobytes() == b"A" * 300 + b"B" * 300 + b"C" * 300
    assert corpus.val.tobytes() == b"A" * 300
    cached = list(cache.glob("*.bin"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = load_corpus(cache, data=str(folder))  # reused, not rewritten
    assert cached[0].stat().st_mtime_ns == mtime
    assert again.train.tobytes() + again.val.tobytes() == b"A" * 300 + b"B" * 300 + b"C" * 300

    globbed = load_corpus(cache, data=str(folder / "*.txt"))
    assert globbed.train.tobytes() + globbed.val.tobytes() == b"A" * 300 + b"B" * 300


def test_saved_dataset_auto_detects_the_text_column(tmp_path):
    import datasets

    rows = {"id": [1, 2, 3], "text": ["héllo", "", "world"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(tmp_path / "cache", dataset=str(tmp_path / "ds"))
    expected = "héllo\nworld\n".encode()
    assert corpus.train.tobytes() + corpus.val.tobytes() == expected
    assert len(list((tmp_path / "cache").glob("dataset-*.bin"))) == 1


def test_saved_dataset_dict_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["abc"] * 10}),
        validation=datasets.Dataset.from_dict({"text": ["xyz"] * 5}),
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    corpus = load_corpus(tmp_path / "cache", dataset=str(tmp_path / "dd"), val_split="validation")
    assert corpus.train.tobytes() == b"abc\n" * 10
    assert corpus.val.tobytes() == b"xyz\n" * 5
    with pytest.raises(DataError, match="no split 'test'; splits: train, validation"):
        load_corpus(tmp_path / "cache", dataset=str(tmp_path / "dd"), split="test")


def test_json_lines_file_with_named_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"title": f"t{i}", "body": f"body {i}"}) + "\n" for i in range(20)))
    with pytest.raises(DataError, match=r"2 string columns; pick the text with --text-field; columns: title"):
        load_corpus(tmp_path / "cache", dataset=str(path))
    corpus = load_corpus(tmp_path / "cache", dataset=str(path), text_field="body")
    assert corpus.train.tobytes() + corpus.val.tobytes() == "".join(f"body {i}\n" for i in range(20)).encode()


def test_dataset_without_text_column_lists_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"a": [1, 2], "b": [0.5, 1.5]}).save_to_disk(str(tmp_path / "nums"))
    with pytest.raises(DataError, match=r"no string column; .*columns: a \(int64\), b \(float64\)"):
        load_corpus(tmp_path / "cache", dataset=str(tmp_path / "nums"))
    assert not (tmp_path / "cache").exists()


def test_default_corpus_is_pydoc_topics():
    corpus = load_corpus("unused")
    text = (corpus.train.tobytes() + corpus.val.tobytes()).decode("utf-8")
    assert len(text) > 400_000
    assert text == "\n".join(topics[k] for k in sorted(topics))


def test_sampler_state_round_trip_and_crops():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    sampler = BatchSampler(data, batch_size=4, block_size=16, seed=3)
    sampler.sample(2)
    state = json.loads(json.dumps(sampler.state))  # JSON-able
    first = sampler.sample(3)
    assert first.shape == (3, 4, 17) and first.dtype == np.uint8
    # every row is a contiguous crop
    assert np.all((np.diff(first.astype(np.int64), axis=-1) % 256) == 1)
    other = BatchSampler(data, batch_size=4, block_size=16, seed=99)
    other.state = state
    assert np.array_equal(other.sample(3), first)


def test_eval_batches_are_fixed_and_cover_the_part():
    data = np.frombuffer(bytes(range(200)), dtype=np.uint8)
    a = eval_batches(data, batch_size=3, block_size=10, n_batches=2)
    assert a.shape == (2, 3, 11)
    assert np.array_equal(a, eval_batches(data, 3, 10, 2))
    assert a[0, 0, 0] == 0 and a[-1, -1, -1] == 199  # first and last byte of the part


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file or folder"):
        load_corpus(tmp_path, data=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match=r"\*.md: the pattern matches no files"):
        load_corpus(tmp_path, data=str(tmp_path / "*.md"))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt: the corpus is empty"):
        load_corpus(tmp_path, data=str(tmp_path / "empty.txt"))


@pytest.mark.parametrize("spec", ["data/train.jsonl", "./corpus", "~/nowhere/x", "typo.parquet", "a/b/c", "x.txt"])
def test_missing_local_dataset_path_is_never_tried_on_the_hub(spec, tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was tried")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"^{re.escape(spec)}: no such dataset file or folder$"):
        load_corpus(tmp_path / "cache", dataset=spec)


@pytest.mark.parametrize("spec", ["roneneldan/TinyStories", "wikitext", "allenai/c4"])
def test_hub_names_do_not_look_like_paths(spec):
    assert not looks_like_path(spec)


def test_folder_skips_our_own_and_binary_files_and_says_so(tmp_path, capsys):
    folder = tmp_path / "runs"
    (folder / "run").mkdir(parents=True)
    (folder / "data_cache").mkdir()
    (folder / "notes.md").write_bytes(b"N" * 100)
    (folder / "run" / "log.txt").write_bytes(b"L" * 50)
    (folder / "run" / "last.npz").write_bytes(b"PK\x03\x04" + b"w" * 500)
    (folder / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (folder / "run" / "last.json").write_text("{}")
    (folder / "data_cache" / "files-0123.bin").write_bytes(b"cached text" * 30)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"x" * 100)
    (folder / ".hidden.txt").write_text("secret")
    corpus = load_corpus(tmp_path / "cache", data=str(folder))
    assert corpus.train.tobytes() + corpus.val.tobytes() == b"N" * 100 + b"L" * 50
    assert capsys.readouterr().err.splitlines()[0] == (  # then tqdm's progress
        f"data: {folder}: took 2 files (150 bytes); skipped 6 (4 .npz/.npy/.bin/.json/.jsonl/.pt, 1 binary, 1 hidden)"
    )
    (folder / "notes.md").unlink()
    (folder / "run" / "log.txt").unlink()
    with pytest.raises(DataError, match=r"the folder holds no text files; skipped 6 \(4 "):
        load_corpus(tmp_path / "cache", data=str(folder))
