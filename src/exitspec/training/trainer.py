"""The head trainer: frozen base, one teacher pass for all exits, AdamW, resumable, data parallel.

    per optimizer step, `grad_accum` micro-batches of
        compute_targets(batch) -> hidden states at every exit layer + teacher logits (one pass of the
                                  frozen base serves every exit)
        HeadSet(targets)       -> sum over exits of KD (+ CE) loss   (only the heads get gradients)
With cfg.teacher = "streamed" (default) the teacher runs inside each step, so memory follows the batch
and not the data set; "cached" runs it once over all data before the first step and keeps its outputs
(every later epoch is then nearly free: the choice for a small model trained for several epochs).
Multi-process data parallel goes through accelerate's Accelerator: only the small HeadSet module is
wrapped (DDP all-reduces the heads' gradients); the base model runs unwrapped and frozen. The data
order is global (one permutation per epoch from the seed, cut into global batches, process r taking
its slice of each) and each process's loss is weighted by its share of the global batch's tokens, so
N processes of batch B train the heads one process of batch N x B trains, and a resumed run sees
exactly the batches it would have seen.

Checkpoints (`WORK/checkpoint/`, safetensors + JSON, never pickle: training/checkpoint.py) hold heads,
optimizer, scheduler, step, micro-batch counter and RNG state; they are written to a temporary folder
and renamed, so a crash never leaves a torn one.
The teacher targets are not checkpointed: the teacher is deterministic, resuming recomputes them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from exitspec.heads.bundle import HeadBundle, fingerprint
from exitspec.heads.kinds import check_head
from exitspec.runtime.sequences import TokenSequence
from exitspec.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from exitspec.training.config import TrainConfig
from exitspec.training.data import collate
from exitspec.training.losses import VocabSubset, add_mass, exit_loss, teacher_mass
from exitspec.training.teacher import Targets, compute_targets
from exitspec.training.teacher_cache import SparseTargets, build_cache, cache_meta, open_cache

CHECKPOINT = "checkpoint"  # a folder: training/checkpoint.py
PICKLE_CHECKPOINT = "checkpoint.pt"  # what exitspec wrote before; refused, never unpickled


class HeadSet(nn.Module):
    """All trainable exits as one module, so DDP sees a single forward per micro-batch."""

    def __init__(self, heads: nn.ModuleDict):
        super().__init__()
        self.heads = heads

    def forward(self, targets: Targets, vocab: VocabSubset, temperature: float,
                ce_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """N trained positions -> (loss summed over exits, per-exit KD (n_exits,))."""
        teacher = vocab.teacher(targets)  # (N, S), shared by every exit
        losses, kds = [], []
        for head in self.heads.values():
            loss, kd = exit_loss(head, targets, teacher, vocab, temperature, ce_weight)
            losses.append(loss)
            kds.append(kd)
        return torch.stack(losses).sum(), torch.stack(kds)


@dataclass
class TrainResult:
    bundle: HeadBundle
    steps: int
    tokens: int  # trained (masked-in) positions, all processes
    wall_s: float
    history: list[dict] = field(default_factory=list)  # {"step", "lr", "loss", "kd": {layer: kd}}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_accelerator(device: torch.device):
    """accelerate's Accelerator when installed (works unlaunched as a single process), else None; on
    the base model's device (a CPU run on a machine with a GPU keeps the heads on the CPU too)."""
    try:
        from accelerate import Accelerator  # optional (the train extra)
    except ModuleNotFoundError:
        return None
    return Accelerator(cpu=device.type == "cpu")


def check_config(cfg: TrainConfig, model) -> None:
    """Refuse settings this model cannot train before any work (generating answers takes minutes):
    exit layers outside the model, a head kind that is unknown or has nothing to train, head options
    the kind does not take."""
    lm = model.lm
    bad = [x for x in cfg.layers if not 0 < x < lm.num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} are outside 1..{lm.num_layers - 1} for {model.name}; pick layers "
                         "in that range (layers=[...])")
    if cfg.kind == "norm_lm":
        raise ValueError("head kind 'norm_lm' has no trainable parameters; pick linear, swiglu or lm_head")
    kind = check_head(cfg.kind, lm, cfg.layers[0], **cfg.head_options)
    if cfg.kd_vocab > 0 and kind.tunes_lm_head(**cfg.head_options):
        # KD over a token subset renormalises over it, so it never constrains how the tuned rows sit
        # against the rows outside it; those stay as they were and win at decode time (measured on
        # the default model: half of an lm_head exit's argmaxes fell on never-trained rows).
        raise ValueError(f"head kind {cfg.kind!r} tunes its LM head, which must train over the whole vocabulary: "
                         "set kd_vocab = 0 (kd_topk may stay)")


def check_work_folder(work: Path, resume: bool, restart: bool) -> None:
    """A work folder holding a checkpoint is continued (resume) or knowingly started over (restart),
    never silently overwritten."""
    found = [p for p in (work / CHECKPOINT, work / PICKLE_CHECKPOINT) if p.exists()]
    if found and not resume and not restart:
        raise ValueError(f"{found[0]} holds a checkpoint of an earlier run; pass --resume to continue it, or "
                         "--restart to train from step 0 and overwrite it (or use another --work folder)")


class Trainer:
    def __init__(self, model, cfg: TrainConfig, examples: list[TokenSequence], work_dir: str | Path,
                 *, progress: bool = True):
        self.model, self.cfg, self.examples = model, cfg, examples
        self.work = Path(work_dir)
        self.progress = progress
        lm = model.lm
        check_config(cfg, model)
        self.acc = make_accelerator(lm.device)
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        torch.manual_seed(cfg.seed)  # head initialisation (zero/identity inits make this moot today)
        self.bundle = HeadBundle.create(lm, cfg.layers, cfg.kind, base_model=model.name, **cfg.head_options)
        self.bundle.train()
        params = [p for p in self.bundle.heads.parameters() if p.requires_grad]
        self.headset = HeadSet(self.bundle.heads)
        # Exits whose heads attend over earlier positions train on whole sequences (heads/block.py).
        self.contextual = frozenset(int(k) for k, h in self.bundle.heads.items() if h.contextual)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # One global batch = batch_size sequences on each of `world` processes (see micro_batch).
        self.micro_per_epoch = len(examples) // (cfg.batch_size * self.world)
        if self.micro_per_epoch == 0:
            raise ValueError(f"{len(examples)} sequences are fewer than one global batch "
                             f"({cfg.batch_size} x {self.world} processes); lower batch_size or add data")
        steps = cfg.epochs * self.micro_per_epoch // cfg.grad_accum
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps > 0 else steps
        if self.total_steps == 0:
            raise ValueError("this configuration makes zero optimizer steps; lower grad_accum or add data")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        # Only the small trainable module is wrapped; optimizer and scheduler stay ours so one
        # scheduler step is one optimizer step whatever the number of processes.
        self.ddp = self.acc.prepare(self.headset) if self.acc else self.headset
        self.step = 0
        self.micro = 0  # global micro-batches consumed: the data position
        self.tokens = 0
        self.history: list[dict] = []
        self.targets: list[Targets] | None = None  # per example, with cfg.teacher "cached"
        self.vocab: VocabSubset | None = None  # the KD vocabulary, set by prepare_targets
        self.sparse: SparseTargets | None = None  # the data set's targets on disk (cfg.teacher_cache)
        self.teacher_s = 0.0

    # --- teacher targets --------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pad = self.model.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def _teacher_pass(self, examples: list[TokenSequence], progress: bool = False,
                      index: list[int] | None = None) -> list[Targets]:
        """compute_targets over `examples` (timed); with the targets cache open, `index` places them in it."""
        cfg = self.cfg
        t0 = time.perf_counter()
        out = compute_targets(self.model.lm, examples, cfg.layers, pad_id=self.pad_id,
                              batch_size=cfg.batch_size, topk=cfg.kd_topk, answer_only=cfg.answer_only,
                              progress=progress and self.progress and self.rank == 0,
                              sparse=self.sparse, index=index, contextual=self.contextual)
        self.teacher_s += time.perf_counter() - t0
        return out

    def prepare_targets(self) -> None:
        """What training needs from the teacher before the first step: with cfg.teacher "cached", the
        one teacher pass over this process's data, kept; "streamed" keeps nothing per example (each
        step runs the teacher on its own batch) and, for a reduced KD vocabulary, sums the teacher's
        token mass batch by batch first, so that the subset is the same as the cached run's."""
        if self.vocab is not None:
            return
        cfg, V = self.cfg, self.model.lm.vocab_size
        reduce = (lambda x: self.acc.reduce(x, "sum")) if self.acc and self.world > 1 else None
        if cfg.teacher_cache:
            self.sparse = self._open_teacher_cache()
            self.vocab = VocabSubset.from_mass(*self._cached_mass(), V, cfg.kd_vocab)
        elif cfg.teacher == "cached":
            # Any process may draw any sequence (one global order), so each keeps every sequence's targets.
            self.targets = self._teacher_pass(self.examples, progress=True)
            self.vocab = VocabSubset.from_targets(self.targets, V, cfg.kd_vocab)
        elif cfg.kd_topk > 0:
            data = self.examples[self.rank:: self.world]  # the processes split the pass; reduce sums it
            mass, is_label = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
            for s in range(0, len(data), cfg.batch_size):
                m, lab = teacher_mass(self._teacher_pass(data[s: s + cfg.batch_size]), V)
                mass += m
                is_label = torch.maximum(is_label, lab)
            self.vocab = VocabSubset.from_mass(mass, is_label, V, cfg.kd_vocab, reduce=reduce)
        else:
            self.vocab = VocabSubset(None, V)  # dense targets score the whole vocabulary

    def _open_teacher_cache(self) -> SparseTargets:
        """The data set's sparse targets from cfg.teacher_cache, written first by the main process
        (one full teacher pass) unless a cache made from this very model, data and k is there."""
        cfg, B = self.cfg, self.cfg.batch_size
        meta = cache_meta(fingerprint(self.model.lm), self.examples, cfg.kd_topk, cfg.answer_only)
        if self.rank == 0 and open_cache(cfg.teacher_cache, meta) is None:
            build_cache(cfg.teacher_cache, meta, (self._teacher_pass(self.examples[s: s + B], progress=s == 0)
                                                  for s in range(0, len(self.examples), B)))
        if self.acc and self.world > 1:
            self.acc.wait_for_everyone()
        return open_cache(cfg.teacher_cache, meta)

    def _cached_mass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """teacher_mass over the cached targets, and the labels of the trained positions."""
        V, sp = self.model.lm.vocab_size, self.sparse
        mass, is_label = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
        for lo in range(0, sp.rows, 65536):  # a slice of the mapped file at a time
            add_mass(mass, torch.from_numpy(np.array(sp.top_ids[lo: lo + 65536])),
                     torch.from_numpy(np.array(sp.top_logits[lo: lo + 65536])))
        for s in range(0, len(self.examples), 256):
            batch = collate(self.examples[s: s + 256], self.pad_id, self.cfg.answer_only)
            labels = batch.labels[batch.mask]
            is_label[labels[labels >= 0]] = 1.0
        return mass, is_label

    def targets_for(self, idx: list[int]) -> Targets:
        """The teacher's targets for the examples `idx`."""
        if self.targets is not None:
            return Targets.cat([self.targets[i] for i in idx])
        # With the targets cache: the base up to the deepest exit, the rest read from the file.
        return Targets.cat(self._teacher_pass([self.examples[i] for i in idx], index=idx))

    # --- data order --------------------------------------------------------------------------------
    def micro_batch(self, micro: int) -> list[int]:
        """This process's sequences of global micro-batch `micro`: one permutation of the data per
        epoch (from the seed alone), cut into global batches of batch_size x world, each process
        taking its slice. So N processes of batch B see, together, the batches one process of batch
        N x B would, and a resumed run (same micro counter) the batches it would have seen."""
        epoch, i = divmod(micro, self.micro_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch * 1009)
        order = torch.randperm(len(self.examples), generator=g)
        B = self.cfg.batch_size
        lo = (i * self.world + self.rank) * B
        return order[lo: lo + B].tolist()

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, "sum") if self.acc and self.world > 1 else x

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {"heads": self.bundle.heads.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "step": self.step, "micro": self.micro,
                 "tokens": self.tokens, "history": self.history, "config": self.cfg.to_dict(),
                 "rng": torch.get_rng_state(), "world": self.world}
        save_checkpoint(self.work / CHECKPOINT, state)

    def load_checkpoint(self) -> bool:
        path = self.work / CHECKPOINT
        if not path.exists():
            if (self.work / PICKLE_CHECKPOINT).exists():
                raise CheckpointError(
                    f"{self.work / PICKLE_CHECKPOINT} is a pickle checkpoint from an earlier exitspec; exitspec no "
                    "longer reads pickle files (reading one can run any code it holds). Delete it and train from "
                    "step 0, or pass another --work folder")
            return False
        state = load_checkpoint(path)
        mine = self.cfg.to_dict()
        theirs = state["config"]
        diff = sorted(k for k in mine if k not in ("threads", "checkpoint_every") and mine[k] != theirs.get(k))
        if diff:
            raise ValueError(f"checkpoint {path} was made with different settings ({diff}); resume with the "
                             "same config or start fresh in another --work folder")
        if state["world"] != self.world:
            raise ValueError(f"checkpoint {path} was made with {state['world']} processes, not {self.world}; "
                             "resume with the same number of processes")
        self.bundle.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.micro, self.tokens = state["step"], state["micro"], state["tokens"]
        self.history = state["history"]
        torch.set_rng_state(state["rng"])
        return True

    # --- the loop --------------------------------------------------------------------------------------
    def train(self, *, resume: bool = False, restart: bool = False, stop_after: int | None = None) -> TrainResult:
        """Run to the end (or `stop_after` optimizer steps, for tests of resuming). A work folder that
        holds a checkpoint needs resume (continue it) or restart (overwrite it)."""
        cfg = self.cfg
        check_work_folder(self.work, resume, restart)
        if resume and not self.load_checkpoint() and self.rank == 0:
            print(f"no checkpoint in {self.work}; starting from step 0")
        self.prepare_targets()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train heads", unit="step",
                   disable=not self.progress or self.rank != 0)
        t0, tokens0 = time.perf_counter(), self.tokens
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        while self.step < end:
            loss_sum, kd_sum = 0.0, torch.zeros(len(cfg.layers))
            for _ in range(cfg.grad_accum):
                targets = self.targets_for(self.micro_batch(self.micro))
                loss, kd = self.ddp(targets, self.vocab, cfg.temperature, cfg.ce_weight)
                # Losses are token means over this process's rows, and DDP averages the processes'
                # gradients: weighting each process by its share of the global batch's tokens makes
                # that average the token mean over the whole global batch, as one process computes it.
                n = torch.tensor(float(targets.tokens))
                total = self._global_sum(n.clone())
                share = float(n * self.world / total) if total > 0 else 1.0
                scaled = loss * share / cfg.grad_accum
                if self.acc:
                    self.acc.backward(scaled)
                else:
                    scaled.backward()
                part = torch.cat([loss.detach().float().cpu()[None], kd.float().cpu()]) * n / max(float(total), 1.0)
                part = self._global_sum(part)  # the global batch's token-mean loss and KDs, for the record
                loss_sum += float(part[0]) / cfg.grad_accum
                kd_sum += part[1:] / cfg.grad_accum
                self.micro += 1
                self.tokens += int(total)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.headset.parameters(), cfg.max_grad_norm)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            rec = {"step": self.step, "lr": self.sched.get_last_lr()[0], "loss": round(loss_sum, 5),
                   "kd": {str(layer): round(float(k), 5) for layer, k in zip(cfg.layers, kd_sum, strict=True)}}
            self.history.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{(self.tokens - tokens0) / (time.perf_counter() - t0):.0f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        wall = time.perf_counter() - t0
        self.save_checkpoint()  # the end state: `--resume` of a finished run has nothing left to do
        self.bundle.eval().requires_grad_(False)
        return TrainResult(self.bundle, self.step, self.tokens - tokens0, wall, self.history)

