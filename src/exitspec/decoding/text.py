"""Streaming text of one generated row: incremental detokenisation, stop strings, held-back characters."""

from __future__ import annotations


class RowText:
    """Incremental detokenisation with hold-back for stop strings and incomplete characters.

    Decoding the whole answer after every step costs O(length) per step, O(length^2) per answer.
    Instead, as in vLLM's detokenizer, only the tokens since the last complete point are
    decoded, together with the chunk before it for context (so a SentencePiece word-start space or a
    byte-level character split over tokens comes out as in a full decode); the new text is what that
    decode adds to the context's. Tokenizers that rewrite spaces across tokens while decoding
    (`clean_up_tokenization_spaces`) keep the full decode."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already emitted
        self.incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self.done = ""  # text of ids[:read]
        self.prefix = self.read = 0  # ids[prefix:read]: the context re-decoded with the new tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, ids: list[int]) -> str:
        """The text of `ids` (the row's generated tokens so far, a growing list)."""
        if not self.incremental:
            return self._decode(ids)
        before = self._decode(ids[self.prefix:self.read])
        now = self._decode(ids[self.prefix:])
        if not now.startswith(before):  # the context decodes differently with what follows: start over
            self.done, self.prefix, self.read = self._decode(ids), self.read, len(ids)
            return self.done
        text = self.done + now[len(before):]
        if not now.endswith("\ufffd"):  # a complete point: later steps decode from here
            self.done, self.prefix, self.read = text, self.read, len(ids)
        return text

    def find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def delta(self, text: str, final: bool) -> str:
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if not final and text[self.sent:end].endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        out = text[self.sent:end]
        self.sent = end
        return out
