import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A tiny model and batch shape for training tests (each run takes well under a second).
TINY_RUN = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2",
            "--sample-tokens", "0", "--no-progress"]


@pytest.fixture
def corpus_file(tmp_path):
    """A small repetitive text: easy to learn, long enough for a 90/10 split at block size 64."""
    path = tmp_path / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return path
