"""Prompt sets: read the common public formats, with a fixed train / held-out split.

Formats (detected per record): a JSON string per line; MT-Bench / Spec-Bench (`turns`, optional
`category`, `question_id`); ShareGPT (`conversations` with `from`/`value` or `role`/`content`);
instruction / response pairs (`instruction`, `input`); GSM8K (`question`); HumanEval (`prompt`);
Open-Assistant trees (`prompt.text`, `replies`); plain `prompt` / `text` fields. `.json` arrays,
`.jsonl` and `.jsonl.gz` files are read. Multi-turn records (MT-Bench turns, conversations, trees)
also keep their user turns in order (`Prompt.user_turns`) for self-distillation to answer one by one.

Split: the last `heldout_fraction` (20%) of every file is held out for evaluation and never used
for training (the recipe suggested by ../shared/data/SOURCES.md); `split="train"` gives the rest.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from exitspec.paths import shared_data_dir

HELDOUT_FRACTION = 0.2


@dataclass
class Prompt:
    text: str  # the user turn (first turn for multi-turn records)
    category: str = ""
    id: str = ""
    reference: str = ""  # a reference answer when the record has one (training may use it)
    # The whole conversation of a multi-turn record ({"role": "user" | "assistant", "content"}, user
    # first, alternating); None for single-turn records.
    turns: list[dict] | None = None
    # Every user turn of a multi-turn record, in order, user_turns[0] == text (MT-Bench `turns`; a
    # conversation's user messages, a last unanswered one included; an Open-Assistant tree's first reply
    # chain): what self-distillation answers with the model's own earlier answers in between. None for
    # single-turn records, so those compare and behave as before.
    user_turns: list[str] | None = None


def _records(path: Path) -> list:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("[") and not path.name.endswith((".jsonl", ".jsonl.gz")):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _alternating(conv: list[dict]) -> list[dict]:
    """A ShareGPT / chat record's messages as alternating user / assistant turns starting with the
    user (system and other roles dropped); it may end with a user turn."""
    turns: list[dict] = []
    for m in conv:
        role = ROLES.get(m.get("from", m.get("role")))
        text = m.get("value", m.get("content", ""))
        if role is None or not isinstance(text, str) or not text.strip():
            continue
        if (not turns and role != "user") or (turns and turns[-1]["role"] == role):
            continue  # keep strict alternation from a user turn
        turns.append({"role": role, "content": text})
    return turns


def conversation_turns(conv: list[dict]) -> list[dict] | None:
    """A ShareGPT / chat record's answered turns (see _alternating), or None when it has no more than
    one exchange."""
    turns = _alternating(conv)
    if turns and turns[-1]["role"] == "user":
        turns.pop()
    return turns if len(turns) > 2 else None


def _several(users: list[str]) -> list[str] | None:
    return users if len(users) > 1 else None


def tree_user_turns(node: dict) -> list[str]:
    """The user turns along an Open-Assistant tree's first reply chain: the root prompt, then the first
    user reply to its first assistant reply, and so on (deleted messages skipped; sibling replies are
    alternatives to each other, not later turns)."""
    users: list[str] = []
    want = "prompter"
    while isinstance(node, dict):
        if want == "prompter":
            text = node.get("text")
            if not isinstance(text, str) or not text.strip():
                break
            users.append(text)
        want = "assistant" if want == "prompter" else "prompter"
        node = next((r for r in node.get("replies") or [] if isinstance(r, dict) and r.get("role") == want
                     and not r.get("deleted")), None)
    return users


def to_prompt(rec, index: int, category: str) -> Prompt | None:
    if isinstance(rec, str):
        return Prompt(rec, category, str(index))
    if not isinstance(rec, dict):
        return None
    rid = str(rec.get("question_id", rec.get("task_id", rec.get("id", index))))
    cat = rec.get("category", category)
    if rec.get("turns"):
        users = [t.get("content", "") if isinstance(t, dict) else t for t in rec["turns"]]
        chain: list[str] = []
        for u in users:  # an empty or unreadable turn ends the chain: later turns would refer to it
            if not isinstance(u, str) or not u.strip():
                break
            chain.append(u)
        return Prompt(users[0] if isinstance(users[0], str) else "", cat, rid, user_turns=_several(chain))
    if rec.get("conversations"):
        conv = rec["conversations"]
        user = next((m for m in conv if m.get("from", m.get("role")) in ("human", "user")), conv[0])
        reply = next((m for m in conv if m.get("from", m.get("role")) in ("gpt", "assistant")), None)
        text = user.get("value", user.get("content", ""))
        ref = (reply or {}).get("value", (reply or {}).get("content", ""))
        users = [t["content"] for t in _alternating(conv) if t["role"] == "user"]
        return Prompt(text, cat, rid, ref, conversation_turns(conv),
                      _several(users) if users and users[0] == text else None)
    if "instruction" in rec:
        text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return Prompt(text, cat, rid, rec.get("response", rec.get("output", "")))
    if "question" in rec:
        return Prompt(rec["question"], cat, rid, rec.get("answer", ""))
    if isinstance(rec.get("prompt"), dict):  # Open-Assistant message tree
        return Prompt(rec["prompt"].get("text", ""), cat, rid, user_turns=_several(tree_user_turns(rec["prompt"])))
    for key in ("prompt", "text"):
        if isinstance(rec.get(key), str):
            return Prompt(rec[key], cat, rid)
    return None


# The held-out split's two parts, by record parity: calibration takes the even records, evaluation
# (and the bench's split "eval") the odd ones, so thresholds are never judged on what chose them.
PARTS = {"calibrate": 0, "eval": 1}


def load_prompts(path: str | Path, *, split: str = "all", limit: int | None = None,
                 heldout_fraction: float = HELDOUT_FRACTION, max_chars: int | None = None) -> list[Prompt]:
    """Prompts of one file. split: "train" (first 80%), "heldout" (last 20%) or "all"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    category = path.parent.name
    prompts = [p for i, r in enumerate(_records(path)) if (p := to_prompt(r, i, category)) and p.text.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts in a format exitspec reads (see exitspec.prompts)")
    cut = len(prompts) - max(1, int(round(len(prompts) * heldout_fraction)))
    if split == "train":
        prompts = prompts[:cut]
    elif split == "heldout":
        prompts = prompts[cut:]
    if max_chars:
        prompts = [p for p in prompts if len(p.text) <= max_chars]
    return prompts[:limit] if limit else prompts


DEFAULT_SETS = (
    "oasst_sample/prompt_lottery_en_250_text.jsonl",
    "gpteacher/codegen-instruct.json",
    "gsm8k/train.jsonl",
    "gpteacher/roleplay-simple-deduped-roleplay-instruct.json",
    "humaneval/HumanEval.jsonl.gz",
)


# Original prompts shipped with exitspec (50 each of chat, code, math, roleplay, interleaved), for an
# installed exitspec without the repository's public sets beside it.
STARTER_FILE = Path(__file__).with_name("assets") / "prompts" / "starter.jsonl"


def prompt_sets(split: str, data_dir: str | Path | None = None, max_chars: int | None = 1500,
                limit: int | None = None) -> list[list[Prompt]]:
    """The `split` of each prompt set: the public sets in `data_dir` (default: ../shared/data beside a
    checkout), else, when no folder was named and none is there, the starter set's categories."""
    root = Path(data_dir) if data_dir else shared_data_dir()
    if root is not None and root.is_dir():
        return [load_prompts(root / rel, split=split, limit=limit, max_chars=max_chars)
                for rel in DEFAULT_SETS if (root / rel).is_file()]
    if data_dir:
        raise FileNotFoundError(f"prompt data folder {data_dir} does not exist; pass an existing --data-dir")
    starter = load_prompts(STARTER_FILE, split=split, max_chars=max_chars)
    return [[p for p in starter if p.category == c][:limit] for c in dict.fromkeys(p.category for p in starter)]


def interleave(sets: list[list[Prompt]]) -> list[Prompt]:
    """One prompt of each set in turn (so any prefix mixes every kind)."""
    return [s[i] for i in range(max((len(s) for s in sets), default=0)) for s in sets if i < len(s)]


def mixed_prompts(split: str, per_set: int, data_dir: str | Path | None = None,
                  max_chars: int = 1500) -> list[Prompt]:
    """`per_set` prompts from each prompt set (chat, code, math, roleplay), interleaved."""
    return interleave(prompt_sets(split, data_dir, max_chars, limit=per_set))
