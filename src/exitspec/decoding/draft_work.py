"""What one drafted token costs, counted rather than timed: weight bytes read and FLOPs, by part.

A draft of an exit at layer l runs layers 0..l, the exit head's own parameters (an adapter; none for
the logit lens) and the rows of the LM head it drafts over: all V rows, or the N of a reduced draft
vocabulary (draft_vocab.py, FR-Spec's frequency-ranked subset). A batch-1 decode step of a small
model on a CPU streams its weights once per token and does little else, so the bytes of weights a
draft reads are what its time follows; unlike a timing, the count is the same on a busy shared
machine and on a quiet one, and says before any benchmark how much of a draft is the LM head. That
share is what a big vocabulary changes: a 262,144-token head (Gemma 3) holds more weights than all
the decoder layers of a 270M model, so a draft at any exit reads mostly head, and a reduced vocabulary
removes most of it (figures: benchmarks/gemma3-fr-spec/).

Counted per drafted token, one row:
  layers  projection weights of layers 0..l-1 as the runtime holds them (a kernel's packed codes and
          scales, or dense tensors: LayeredModel.layer_weight_bytes), 2 FLOPs per weight. Attention
          over the cache is left out: it grows with the context and is the same with any head.
  head    the head's own weights (2 FLOPs each) and the N rows of the LM head it reads, as the
          draft runs them (the checkpoint's Q8_0 / K-quant codes in int4 mode, else the runtime's
          head or fp32 rows): N x C x 2 FLOPs.
Verification is not a draft cost: it runs the full head on every cycle whatever the drafts read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exitspec.decoding.draft_vocab import DraftHead


@dataclass(frozen=True)
class DraftWork:
    """Weight bytes read and FLOPs of one drafted token (one row), by part."""

    exit_layer: int
    vocab: int  # rows of the LM head a draft reads (V without a reduced draft vocabulary)
    hidden: int  # C
    layer_bytes: int
    layer_flops: int
    adapter_bytes: int  # the exit head's own weights (0 for the logit lens)
    adapter_flops: int
    lm_head_bytes: int  # the LM-head rows a draft reads
    lm_head_flops: int

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.adapter_bytes + self.lm_head_bytes

    @property
    def total_flops(self) -> int:
        return self.layer_flops + self.adapter_flops + self.lm_head_flops

    @property
    def head_share(self) -> float:
        """Fraction of a draft's weight bytes that are the LM head's rows."""
        return self.lm_head_bytes / self.total_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "total_flops": self.total_flops,
                "head_share": self.head_share}


def draft_work(drafter: DraftHead) -> DraftWork:
    """Count what one token drafted by `drafter` (an exit head, with or without a reduced vocabulary)
    reads and computes on its runtime."""
    head = drafter.head
    lm = head.lm
    C, layer = lm.hidden_size, head.layer
    layer_flops = 2 * sum(p.numel() for blk in lm.adapter.layers[:layer] for p in blk.parameters() if p.dim() == 2)
    tuned = head.head_weight()
    own = [p for p in head.parameters() if p is not tuned and p is not head.head_bias()]
    if drafter.vocab is not None:
        rows, head_bytes = int(drafter.vocab.numel()), drafter.proj.nbytes
    else:
        rows = tuned.shape[0]
        head_bytes = lm.head_weight_bytes if tuned is lm.lm_head.weight else tuned.numel() * tuned.element_size()
    return DraftWork(exit_layer=layer, vocab=rows, hidden=C,
                     layer_bytes=lm.layer_weight_bytes(0, layer), layer_flops=layer_flops,
                     adapter_bytes=sum(p.numel() * p.element_size() for p in own),
                     adapter_flops=2 * sum(p.numel() for p in own if p.dim() == 2),
                     lm_head_bytes=head_bytes, lm_head_flops=2 * rows * C)
