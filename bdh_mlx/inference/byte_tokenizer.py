"""The tokenizer of every bdh-mlx model: token ids are byte values (UTF-8 text in, bytes out).

``load(path, return_tokenizer=True)`` returns it beside the model, for code written for mlx-lm's
``model, tokenizer = load(...)``; bdh-mlx's own functions take text directly and need no tokenizer.
"""


class ByteTokenizer:
    """``encode(text) -> byte values``, ``decode(ids) -> text``: what an exported folder's tokenizer.json does."""

    vocab_size = 256
    eos_token_ids = frozenset()  # a byte model has no end-of-text token; instruction-tuned ones end at a marker

    def encode(self, text: str) -> list:
        return list(text.encode("utf-8", errors="surrogateescape"))

    def decode(self, tokens) -> str:
        return bytes(int(t) if int(t) < 256 else 0xFF for t in tokens).decode("utf-8", errors="replace")
