"""GSM8K accuracy of exitspec's decoding modes through lm-evaluation-harness, from local files.

    python benchmarks/lm_eval_gsm8k.py --model default --weights int4 --heads default \
        --questions ../shared/data/gsm8k/train.jsonl --split eval --limit 50 \
        --run vanilla --run "cascade threshold=0.9" --out benchmarks/lm_eval

What it does, in one command a user can point at their own model and their own GSM8K-style file:
1. Takes `--limit` questions of `--questions` (a JSONL of {"question", "answer"} records, answers in
   GSM8K's "... #### 42" form) from `--split` (bench/config.py's splits: "eval" = held-out records
   that `exitspec calibrate` never takes), writes them and a generate_until task config into a
   temporary folder (no hub access at run time).
2. Runs lm-eval's `simple_evaluate` once per `--run` (a strategy and its options, as `exitspec bench
   --run` takes them) through the `exitspec` model adapter (bench/tasks.py), greedy, chat template on,
   stopping at the model's EOS or `--max-gen-toks`.
3. Decodes every question once more with plain `exitspec.generate` (vanilla) and checks that lm-eval's
   vanilla answers are the same text, question by question: the adapter adds nothing of its own.
4. Writes report.md and samples.jsonl in `--out`: per mode, GSM8K accuracy (the answer's final
   number equals the reference's) and answer agreement with vanilla (the final numbers equal).

lm-eval is the optional `eval` extra (pip install 'exitspec[eval]').
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from exitspec.bench.config import BenchConfig, load_bench_prompts, parse_run
from exitspec.bench.machine import describe_machine, machine_line
from exitspec.bench.metrics import final_number
from exitspec.bench.tasks import EXTRA_HINT, register
from exitspec.decoding.api import generate
from exitspec.loading import load

TASK = "gsm8k_exitspec"


def write_task(folder: Path, questions: list[dict], max_gen_toks: int) -> None:
    """A zero-shot GSM8K generate_until task over a local JSONL (lm-eval's `json` dataset loader)."""
    data = folder / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    # The question alone is the context (the adapter applies the chat template with chat=True); no
    # stop string: the model's own EOS ends an answer, as in `exitspec generate`.
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs:\n  until: []\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def run_mode(args, run: dict, tasks: Path) -> list[str]:
    """lm-eval's generated answers for one mode, in question order."""
    import lm_eval  # optional: the eval extra
    from lm_eval.tasks import TaskManager

    opts = {k: v for k, v in run.items() if k != "name"}
    model_args = ",".join(f"{k}={v}" for k, v in {
        "model": args.model, "heads": args.heads, "weights": args.weights, "strategy": run["name"],
        "chat": True, "max_gen_toks": args.max_gen_toks, **opts}.items() if v is not None)
    out = lm_eval.simple_evaluate(model="exitspec", model_args=model_args, tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


def label(run: dict) -> str:
    opts = " ".join(f"{k}={v}" for k, v in run.items() if k != "name")
    return f"{run['name']} {opts}".strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--weights", default="int4", choices=("dense", "int4"))
    p.add_argument("--heads", default="default", help="head bundle for the lossy modes ('none': no heads)")
    p.add_argument("--questions", default="../shared/data/gsm8k/train.jsonl")
    p.add_argument("--split", default="eval", help="heldout, eval, train or all (bench/config.py)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--run", action="append", default=[], metavar="'NAME key=v ...'",
                   help="a mode and its options (repeatable; one value per option); vanilla is always run")
    p.add_argument("--out", default="benchmarks/lm_eval")
    args = p.parse_args(argv)
    try:
        register()
    except ModuleNotFoundError:
        print(f"lm_eval_gsm8k: {EXTRA_HINT}", file=sys.stderr)
        return 2
    heads = None if args.heads == "none" else args.heads
    args.heads = heads
    runs = [{"name": "vanilla"}] + [r for r in map(parse_run, args.run) if r != {"name": "vanilla"}]
    for r in runs:
        if any(isinstance(v, list) for v in r.values()):
            raise SystemExit(f"--run {label(r)!r}: one value per option here (no grids)")
    prompts = load_bench_prompts(BenchConfig(prompts=args.questions, split=args.split, num_prompts=args.limit))
    questions = [{"question": q.text, "answer": q.reference} for q in prompts]
    if not any(final_number(q["answer"]) for q in questions):
        raise SystemExit(f"{args.questions}: no record has a numeric answer ('... #### 42'); is it GSM8K-style?")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp), questions, args.max_gen_toks)
        answers = {label(r): run_mode(args, r, Path(tmp)) for r in runs}

    # The same questions through plain exitspec.generate: lm-eval's vanilla must be this, question by question.
    model = load(args.model, heads=heads, weights=args.weights)
    direct = [generate(model, q["question"], max_new_tokens=args.max_gen_toks, chat=True).texts[0]
              for q in questions]
    vanilla = answers["vanilla"]
    same_text = sum(a == b for a, b in zip(vanilla, direct, strict=True))
    same_answer = sum(final_number(a) == final_number(b) for a, b in zip(vanilla, direct, strict=True))

    refs = [final_number(q["answer"]) for q in questions]
    lines = [f"# GSM8K through lm-evaluation-harness: {model.name}, weights {args.weights}", "",
             f"Machine: {machine_line(describe_machine())}", "",
             f"Questions: {len(questions)} of {args.questions}, split {args.split}; zero-shot, chat template, "
             f"greedy, up to {args.max_gen_toks} tokens (the model's EOS ends an answer). Accuracy = the answer's "
             "final number equals the reference's; agreement = equals vanilla's (lm-eval's vanilla run).", "",
             f"lm-eval's vanilla vs plain `exitspec.generate`, question by question: identical text on "
             f"{same_text}/{len(questions)}, the same final number on {same_answer}/{len(questions)}.", "",
             "| mode | GSM8K accuracy | answer agreement with vanilla |",
             "|---|---:|---:|"]
    for name, texts in answers.items():
        acc = sum(final_number(t) == r for t, r in zip(texts, refs, strict=True)) / len(refs)
        agree = sum(final_number(t) == final_number(v) for t, v in zip(texts, vanilla, strict=True)) / len(refs)
        lines.append(f"| {name} | {acc:.3f} | {agree:.3f} |")
    lines.append(f"| plain exitspec.generate (vanilla) | "
                 f"{sum(final_number(t) == r for t, r in zip(direct, refs, strict=True)) / len(refs):.3f} | "
                 f"{same_answer / len(refs):.3f} |")
    lines += ["", "Command:", "", "    python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), ""]
    (out / "report.md").write_text("\n".join(lines))
    with (out / "samples.jsonl").open("w") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"question": q["question"], "reference": refs[i], "direct_vanilla": direct[i],
                                **{name: texts[i] for name, texts in answers.items()}}) + "\n")
    print("\n".join(lines))
    return 0 if same_text == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())
