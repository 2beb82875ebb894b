"""`exitspec train`: train exit heads by self-distillation and save a bundle.

    exitspec train --config configs/heads-smollm2.toml --out DIR [--resume | --restart] [KEY=VALUE ...]
    exitspec train --config ... --out DIR --sweep temperature=1,2,4     # DIR/temperature-1, ..., DIR/sweep-eval
    exitspec train --config ... --out DIR --ft-last-block     # DIR/head-only, DIR/ft-last-block, DIR/sweep-eval

Work files (self-distilled answers, checkpoints) go to --work (default runs/<name of DIR>); the
bundle folder DIR is written atomically at the end and holds only bundle.json + heads.safetensors
(which also keeps the self-distilled answers as the draft datastore of the `lookup` strategy).
Runs unchanged under `accelerate launch --multi_gpu --num_processes N -m exitspec.cli train ...`
(on a machine without GPUs this is N CPU processes over gloo; `--cpu` alone starts one process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exitspec.calibration.evaluate import evaluate_bundles, evaluate_heads, format_table, plot_layer_sweep, write_csv
from exitspec.calibration.sequences import heldout_prompts
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import load
from exitspec.prompts import DEFAULT_SETS
from exitspec.training.config import TrainConfig, apply_overrides
from exitspec.training.data import DistillSettings, build_examples, draft_corpus, eval_sequences, self_distill
from exitspec.training.trainer import Trainer, check_config, check_work_folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or JSON training config (see configs/); defaults if omitted")
    p.add_argument("--out", required=True, help="bundle folder to write (bundle.json + heads.safetensors)")
    p.add_argument("--work", help="folder for self-distilled data and checkpoints (default runs/<out name>)")
    p.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint/ at the same step")
    p.add_argument("--restart", action="store_true",
                   help="train from step 0 even though WORK holds a checkpoint (it is overwritten)")
    p.add_argument("--eval-per-set", type=int, default=0,
                   help="after training, evaluate norm_lm vs the trained heads on N held-out prompts per set "
                        "(the eval part, as `exitspec eval-heads`; answers cached in WORK/heldout.jsonl)")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="train one bundle per value of one setting (OUT/KEY-V, answers generated once) and compare "
                        "them with norm_lm on held-out answers (OUT/sweep-eval), e.g. --sweep temperature=1,2,4")
    p.add_argument("--ft-last-block", action="store_true",
                   help="the research plan's Option B: at each exit l of `layers`, tune the LM head together with the "
                        "last kept layer (l-1) (a `block` head, heads/block.py), against the LM head alone at the same "
                        "exits (OUT/ft-last-block, OUT/head-only, compared in OUT/sweep-eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. lr=3e-4 layers=[4,8]")


# Settings that change which sequences are trained on: a sweep over one of them generates its own data.
DATA_KEYS = {"data", "per_set", "limit", "self_distill", "gen_max_new_tokens", "gen_batch", "gen_temperature",
             "gen_seed", "max_len"}
FIXED_KEYS = {"model", "device", "dtype", "threads"}  # one model is loaded for every run of a sweep


def work_folder(args: argparse.Namespace) -> Path:
    """--work, by default runs/<name of --out>."""
    return Path(args.work) if args.work else Path("runs") / Path(args.out).name


def sweep_runs(args: argparse.Namespace) -> list[tuple[str, TrainConfig, Path, Path]]:
    """(label, config, bundle folder, work folder) of each run: one, or one per value of --sweep."""
    out, work = Path(args.out), work_folder(args)

    def config(extra: list[str]) -> TrainConfig:
        overrides = [*args.overrides, *extra]
        return (TrainConfig.from_file(args.config, overrides) if args.config
                else TrainConfig.from_dict(apply_overrides({}, overrides)))

    base = config([])
    if args.ft_last_block:
        if args.sweep:
            raise ValueError("--ft-last-block is a comparison of its own; run --sweep separately")
        if min(base.layers) < 2:
            raise ValueError(f"--ft-last-block tunes layer l-1 of each exit l: exits must be >= 2, got {base.layers}")
        shared = [] if base.distill_cache else [f"distill_cache={work / 'distill.jsonl'}"]  # answers made once
        # Both cost l layers a token at exit l: the block head reads layer l-1's input through its own layer l-1.
        option_b = ['kind="block"', 'head_options={init="copy", tune_head=true}',
                    f"layers=[{','.join(str(x - 1) for x in base.layers)}]"]
        # Both tune the LM head, so both score the whole vocabulary (check_config says why).
        full_vocab = ["kd_vocab=0", *shared]
        return [("head-only", config(['kind="lm_head"', "head_options={}", *full_vocab]), out / "head-only",
                 work / "head-only"),
                ("ft-last-block", config([*option_b, *full_vocab]), out / "ft-last-block", work / "ft-last-block")]
    if not args.sweep:
        return [("heads", base, out, work)]
    key, sep, values = args.sweep.partition("=")
    key = key.strip()
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or len(vals) < 2:
        raise ValueError(f"--sweep {args.sweep!r}: give KEY=V1,V2[,...] with two or more values, "
                         "e.g. --sweep temperature=1,2,4")
    if key in FIXED_KEYS:
        raise ValueError(f"--sweep cannot vary {key!r}: every run of a sweep shares one loaded model")
    runs = []
    for v in vals:
        label = f"{key}-{v}"
        # Answers generated once for every run, unless the setting changes them or a cache is named already.
        shared = [] if key in DATA_KEYS or base.distill_cache else [f"distill_cache={work / 'distill.jsonl'}"]
        runs.append((label, config([f"{key}={v}", *shared]), out / label, work / label))
    return runs


def run(args: argparse.Namespace) -> int:
    runs = sweep_runs(args)  # every config is read and checked before anything is loaded
    first = runs[0][1]
    if first.threads:
        torch.set_num_threads(first.threads)
    model = load(first.model, device=first.device, dtype=first.dtype or None)
    for _, cfg, _, work in runs:
        check_config(cfg, model)  # before minutes of generating answers
        check_work_folder(work, args.resume, args.restart)
    acc_state = _accelerate_state()
    bundles = {}
    for label, cfg, out, work in runs:
        bundle = train_one(model, cfg, out, work, args, acc_state)
        if bundle is not None:
            bundles[label] = bundle
    _end_processes(acc_state)  # on success only: a barrier after one process failed would hang the rest
    if len(runs) > 1 and bundles:
        compare_sweep(model, bundles, Path(args.out) / "sweep-eval", args.eval_per_set or 5,
                      work_folder(args), first.gen_max_new_tokens)
    return 0


def train_one(model, cfg: TrainConfig, out: Path, work: Path, args: argparse.Namespace, acc_state):
    """Train and save one bundle (None on processes other than the main one)."""
    t_start = time.perf_counter()
    # Only the main process generates the self-distilled data; the others wait and read the cache.
    if acc_state is None or acc_state.is_main_process:
        examples = build_examples(model, cfg, work, progress=not args.no_progress)
    if acc_state is not None:
        acc_state.wait_for_everyone()
        if not acc_state.is_main_process:
            examples = build_examples(model, cfg, work, progress=False)
    t_data = time.perf_counter() - t_start
    trainer = Trainer(model, cfg, examples, work, progress=not args.no_progress)
    result = trainer.train(resume=args.resume, restart=args.restart)
    if trainer.rank != 0:
        return None
    bundle = result.bundle
    bundle.config.training = {
        "config": cfg.to_dict(), "sequences": len(examples), "steps": result.steps,
        "data_s": round(t_data, 1), "teacher_s": round(trainer.teacher_s, 1),
        "teacher_tokens_per_s": round(sum(len(e.ids) for e in examples) / max(trainer.teacher_s, 1e-9), 1),
        "train_s": round(result.wall_s, 1),
        "train_tokens_per_s": round(result.tokens_per_s, 1), "final_kd": result.history[-1]["kd"],
        "rebuild": f"exitspec train --config {args.config} --out {args.out}" if args.config else "",
    }
    if cfg.self_distill and (corpus := draft_corpus(examples)):  # the model's own answers: lookup's datastore
        bundle.set_draft_corpus(corpus, source=f"self-distilled answers to {len(corpus)} prompts of {cfg.data}")
    bundle.save(out, dtype=getattr(torch, cfg.save_dtype))  # first: an evaluation that fails loses no training
    if args.eval_per_set and not (args.sweep or args.ft_last_block):
        bundle.config.training["heldout_eval"] = _evaluate(model, bundle, args.eval_per_set, work,
                                                           cfg.gen_max_new_tokens)
        bundle.save(out, dtype=getattr(torch, cfg.save_dtype))
    (work / "history.json").write_text(json.dumps(result.history))
    print(f"saved {len(bundle.layers)} {cfg.kind} heads at layers {bundle.layers} to {out} "
          f"({result.steps} steps, {result.tokens_per_s:.0f} trained tokens/s, {result.wall_s:.0f} s training)")
    return bundle


def compare_sweep(model, bundles: dict, out: Path, per_set: int, work: Path, max_new_tokens: int) -> None:
    """Every run of a sweep and norm_lm at the same exits on the same held-out answers: results.csv,
    results.json and layer_sweep.png in `out`."""
    layers = sorted({layer for b in bundles.values() for layer in b.layers})
    compared = {**bundles, "norm_lm": HeadBundle.create(model.lm, layers, "norm_lm", base_model=model.name)}
    rows = evaluate_bundles(model, compared, _eval_sequences(model, per_set, work, max_new_tokens))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "results.json").write_text(json.dumps({"model": model.name, "runs": list(bundles), "rows": rows}, indent=2))
    plot_layer_sweep(rows, out / "layer_sweep.png", title=f"{model.name}: sweep of {', '.join(bundles)}")
    print(format_table(rows))
    print(f"wrote {out / 'results.csv'} and {out / 'layer_sweep.png'}")


def _accelerate_state():
    try:
        from accelerate import PartialState  # optional: the train extra
    except ModuleNotFoundError:
        return None
    return PartialState(cpu=not torch.cuda.is_available())


def _end_processes(acc_state) -> None:
    """Tear the process group down on every process before any of them exits.

    Why: a process that leaves with gloo's worker threads still alive aborts in C++ ("terminate
    called without an active exception", SIGABRT), which fails the whole launch at random even
    though training finished. Only the main process writes the bundle, after this point."""
    if acc_state is None or acc_state.num_processes < 2:
        return
    acc_state.wait_for_everyone()
    acc_state.destroy_process_group()


def _eval_sequences(model, per_set: int, work: Path, max_new_tokens: int):
    """Held-out sequences for comparing heads: the "eval" part of the held-out split (the one
    calibration never reads), per_set per prompt set, with the full model's greedy answers cached in
    WORK/heldout.jsonl like training data."""
    prompts = heldout_prompts("eval", per_set * len(DEFAULT_SETS))  # interleaved: per_set from each set
    examples = self_distill(model, prompts, work / "heldout.jsonl", DistillSettings(max_new_tokens=max_new_tokens),
                            progress=False)
    return eval_sequences(examples)


def _evaluate(model, bundle, per_set: int, work: Path, max_new_tokens: int) -> dict:
    """Held-out comparison of the trained heads vs norm_lm, with the `exitspec eval-heads` evaluator."""
    return heldout_eval(model, bundle, _eval_sequences(model, per_set, work, max_new_tokens))


def heldout_eval(model, bundle, sequences) -> dict:
    """Trained heads and norm_lm at the same exits on `sequences`: prints the table and returns
    {"trained" | "norm_lm" | "full": {layer: {kl, ppl, agreement, accuracy, tokens}}} for bundle.json."""
    baseline = HeadBundle.create(model.lm, bundle.layers, "norm_lm", base_model=model.name)
    rows = evaluate_heads(model, bundle, sequences, baseline=baseline, label="trained")
    print(format_table(rows))
    out: dict = {}
    for r in rows:
        out.setdefault(r["bundle"], {})[str(r["layer"])] = {
            "kl": r["kl"], "ppl": r["ppl"], "agreement": r["agreement"], "accuracy": r["accuracy"],
            "tokens": r["n_tokens"]}
    return out
