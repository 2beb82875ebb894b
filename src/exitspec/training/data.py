"""Training sequences for exit heads: chat records, plain text, or the base model's own answers.

A training example is a runtime.sequences.TokenSequence: token ids plus `start` (how many leading
tokens are the prompt), so the loss mask can keep answer tokens only. Sources:
- chat JSONL: ShareGPT `conversations`, instruction/response pairs, formatted with the model's chat
  template (exitspec.prompts parses the record formats);
- prompt-only records (MT-Bench `turns`, GSM8K questions...) and "mixed" (exitspec.prompts.
  mixed_prompts): answered by the base model itself (self-distillation);
- plain text (.txt, or JSONL records with only `text`): trained on as is.
Only the "train" split of a prompt file is ever read: held-out prompts are for evaluation.

Self-distilled answers come from exitspec's own batched vanilla decoding and are cached in a JSONL
file, appended batch by batch, so an interrupted generation continues where it stopped. With
multi_turn, a multi-turn prompt (Prompt.user_turns) is answered turn by turn, each answer generated
after the model's OWN earlier answers (user1, own1, user2, own2, ...), and becomes one conversation
with every assistant turn marked as answer, as reference conversations are; single-turn prompts,
tokenizers without a chat template and templates that do not build a conversation turn by turn get
the first exchange only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from exitspec.decoding.api import encode_prompt, generate
from exitspec.heads.bundle import fingerprint
from exitspec.prompts import Prompt, load_prompts, mixed_prompts, to_prompt
from exitspec.runtime.sequences import TokenSequence, scored_sequence


def chat_ids(tokenizer, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """Prompt (+ answer) through the chat template: (ids, prompt_len)."""
    p_ids = encode_prompt(tokenizer, prompt, chat=True)
    if answer is None:
        return p_ids, len(p_ids)
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        full = tokenizer.apply_chat_template(msgs, tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        if full[: len(p_ids)] == p_ids:
            return full, len(p_ids)
    # No template, or one whose prompt is not a prefix of the conversation: plain concatenation.
    return p_ids + tokenizer(answer, add_special_tokens=False)["input_ids"], len(p_ids)


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def conversation_ids(tokenizer, turns: list[dict]) -> TokenSequence | None:
    """Every turn of a conversation through the chat template, each assistant turn's tokens marked as
    answer; None where the tokenizer has no template or the template does not build the conversation
    turn by turn (each prefix a prefix of the whole), so that the answers cannot be located."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    full = _template_ids(tokenizer, turns, False)
    answer = [False] * len(full)
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, upto = _template_ids(tokenizer, turns[:k], True), _template_ids(tokenizer, turns[: k + 1], False)
        if full[: len(upto)] != upto or upto[: len(before)] != before:
            return None
        answer[len(before): len(upto)] = [True] * (len(upto) - len(before))
    return TokenSequence(full, answer.index(True), answer) if any(answer) else None


def reference_example(tokenizer, prompt: Prompt, multi_turn: bool = True) -> TokenSequence:
    """A record with its reference answer(s): every turn of a multi-turn conversation (multi_turn), else
    the first exchange."""
    if multi_turn and prompt.turns and (seq := conversation_ids(tokenizer, prompt.turns)) is not None:
        return seq
    return TokenSequence(*chat_ids(tokenizer, prompt.text, prompt.reference))


def read_source(source: str, *, per_set: int = 60, limit: int = 0) -> tuple[list[Prompt], list[str]]:
    """(prompts with optional reference answers, plain texts) of a data source, train split only."""
    if source == "mixed":
        return mixed_prompts("train", per_set), []
    if source.startswith("hf:"):
        return _read_hf(source[3:], limit)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist; pass a JSONL/JSON/.txt file, "
                                "'mixed' or 'hf:NAME'")
    if path.suffix == ".txt":
        texts = [t.strip() for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        cut = len(texts) - max(1, round(0.2 * len(texts)))  # same 80/20 rule as exitspec.prompts
        return [], texts[:cut][: limit or None]
    plain = _plain_texts(path)
    if plain is not None:
        cut = len(plain) - max(1, round(0.2 * len(plain)))
        return [], plain[:cut][: limit or None]
    return load_prompts(path, split="train", limit=limit or None), []


def _plain_texts(path: Path) -> list[str] | None:
    """Records that carry only a `text` field are plain text (pre-training style), not prompts."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not (isinstance(first, dict) and set(first) <= {"text", "id", "meta"} and "text" in first):
        return None
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _read_hf(spec: str, limit: int) -> tuple[list[Prompt], list[str]]:
    """'NAME[:SPLIT]' from the `datasets` library (optional; needs the dataset locally or network)."""
    try:
        import datasets  # optional: only hf: sources need it
    except ModuleNotFoundError as err:
        raise ValueError("hf: data needs the `datasets` package: pip install 'exitspec[data]'") from err
    name, _, split = spec.partition(":")
    rows = datasets.load_dataset(name, split=split or "train")
    prompts = [p for i, r in enumerate(rows) if (p := to_prompt(dict(r), i, name))]
    cut = len(prompts) - max(1, round(0.2 * len(prompts)))
    return prompts[:cut][: limit or None], []


# --- self-distillation -----------------------------------------------------------------------------
@dataclass
class DistillSettings:
    max_new_tokens: int = 128
    batch: int = 16
    temperature: float = 0.0
    seed: int = 0

    def meta(self, model_name: str, fingerprint: dict) -> dict:
        return {"model": model_name, "fingerprint": fingerprint, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed}


Key = str | tuple[str, ...]  # a cached answer: the prompt text (first turn) or the user turns so far


def self_distill(model, prompts: list[Prompt], cache: str | Path, settings: DistillSettings,
                 *, multi_turn: bool = False, progress: bool = True) -> list[TokenSequence]:
    """The base model's own answers to `prompts` (cached in `cache`): one sequence per prompt.

    With multi_turn, every user turn of a multi-turn prompt is answered, round by round across the
    prompts (round r answers the r-th user turns, given the conversation so far with the model's own
    earlier answers), and the prompt becomes one conversation through the chat template with every
    assistant turn marked (conversation_ids). Where that cannot work (no chat template, or one that does
    not build the conversation turn by turn, so the answers cannot be located) only the first turn is
    answered, exactly as for a single-turn prompt. A first turn's cache record is keyed by the prompt
    text, as before multi-turn existed: old caches stay valid and serve both settings."""
    cache = Path(cache)
    tok = model.tokenizer
    meta = settings.meta(model.name, fingerprint(model.lm))
    done = _read_cache(cache, meta)
    chains = [_user_chain(tok, p, multi_turn) for p in prompts]
    for r in range(max((len(c) for c in chains), default=0)):
        # A later turn's prompt holds the earlier answers, so its round waits for the previous one.
        todo = [k for k in dict.fromkeys(_key(c[: r + 1]) for c in chains if len(c) > r) if k not in done]
        if todo:
            _answer(model, todo, done, cache, meta, settings, r, progress)
    return [_example(tok, c, done) for c in chains]


def _key(users: tuple[str, ...]) -> Key:
    return users[0] if len(users) == 1 else users


def _user_chain(tokenizer, prompt: Prompt, multi_turn: bool) -> tuple[str, ...]:
    """The user turns self-distillation answers: all of them where the template can hold them (probed
    with a stand-in answer, before any generation is spent on later turns), else the first."""
    users = prompt.user_turns if multi_turn else None
    if not users or len(users) < 2 or users[0] != prompt.text:
        return (prompt.text,)
    probe = [{"role": role, "content": u if role == "user" else "..."} for u in users for role in ("user", "assistant")]
    return tuple(users) if conversation_ids(tokenizer, probe) is not None else (prompt.text,)


def _messages(tokenizer, users: tuple[str, ...], done: dict) -> list[dict]:
    """users[k] with the model's own cached answers to users[:k+1] after each (as many as are done)."""
    msgs = []
    for k, u in enumerate(users):
        msgs.append({"role": "user", "content": u})
        if (key := _key(users[: k + 1])) in done:  # decoded as generate() decodes its texts
            msgs.append({"role": "assistant", "content": tokenizer.decode(done[key][1], skip_special_tokens=True)})
    return msgs


def _answer(model, todo: list[Key], done: dict, cache: Path, meta: dict, settings: DistillSettings,
            r: int, progress: bool) -> None:
    """Generate the answers to `todo` (round r's keys), appending each batch to the cache."""
    tok = model.tokenizer
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not cache.exists():
        cache.write_text(json.dumps({"meta": meta}) + "\n")
    elif not cache.read_bytes().endswith(b"\n"):  # a line cut by a crash: appended records start anew
        with open(cache, "a", encoding="utf-8") as f:
            f.write("\n")
    # Round 0 encodes exactly as before multi-turn existed (same ids, same records); later rounds end with
    # the user turn to answer, after the model's own earlier answers.
    enc = {k: chat_ids(tok, k)[0] if isinstance(k, str) else encode_prompt(tok, _messages(tok, k, done))
           for k in todo}
    todo = sorted(todo, key=lambda k: len(enc[k]))  # similar lengths per batch: less padding in prefill
    bar = tqdm(total=len(todo), desc="self-distill" + (f" turn {r + 1}" if r else ""), unit="prompt",
               disable=not progress)
    t0, n_tok = time.perf_counter(), 0
    for i in range(0, len(todo), settings.batch):
        chunk = todo[i: i + settings.batch]
        # Sampling seeds per batch as before in round 0; later rounds shifted so they do not repeat them.
        seed = settings.seed + i + 1_000_003 * r if settings.temperature > 0 else None
        out = generate(model, None, prompt_ids=[enc[k] for k in chunk], max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, seed=seed)
        with open(cache, "a", encoding="utf-8") as f:  # one line per answer: a crash loses one batch
            for k, ids in zip(chunk, out.token_ids, strict=True):
                # A later turn's record: `turns` is its key (no prompt text can collide with it); `prompt`
                # (their JSON) only keeps the line readable by exitspec versions from before multi-turn.
                rec = {"prompt": k} if isinstance(k, str) else {"prompt": json.dumps(list(k)), "turns": list(k)}
                f.write(json.dumps(rec | {"prompt_ids": enc[k], "answer_ids": ids}) + "\n")
                done[k] = (enc[k], ids)
        n_tok += sum(len(x) for x in out.token_ids)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()


def _example(tokenizer, users: tuple[str, ...], done: dict) -> TokenSequence:
    """A single-turn prompt: its prompt and answer ids as generated. A conversation: re-encoded through
    the template (the generated ids of later turns were prompts, not one sequence), answers marked."""
    if len(users) > 1:
        msgs = _messages(tokenizer, users, done)
        if (seq := conversation_ids(tokenizer, msgs)) is not None:
            return seq
    p_ids, a_ids = done[users[0]]
    return TokenSequence(p_ids + a_ids, len(p_ids))


def _read_cache(cache: Path, meta: dict) -> dict[Key, tuple[list[int], list[int]]]:
    if not cache.exists():
        return {}
    lines = cache.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0])["meta"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        head = None
    if head != meta:
        raise ValueError(f"self-distillation cache {cache} was made with other settings or another model "
                         f"({head}); delete it or set distill_cache to a new file")
    done: dict[Key, tuple[list[int], list[int]]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: that prompt is generated again
        key = tuple(rec["turns"]) if "turns" in rec else rec["prompt"]
        done[key] = (rec["prompt_ids"], rec["answer_ids"])
    return done


HEADER_TOKENS = 3  # the end of the chat template's assistant header, kept before each answer


def draft_corpus(examples: list[TokenSequence]) -> list[list[int]]:
    """The answers of chat examples for lookup's draft datastore, each with the last few prompt
    tokens (the assistant header) so the store also learns how this model starts its answers. A
    conversation gives each of its answers (its user turns are not the model's text)."""
    return [e.ids[max(0, a - HEADER_TOKENS): b] for e in examples for a, b in _answer_spans(e) if 0 < a < b]


def _answer_spans(e: TokenSequence) -> list[tuple[int, int]]:
    """(start, end) of each run of answer tokens: where the flags switch on, then off."""
    if e.answer is None:
        return [(e.start, len(e.ids))]
    edges = [k for k in range(len(e.ids) + 1)
             if (k < len(e.ids) and e.answer[k]) != (k > 0 and e.answer[k - 1])]
    return list(zip(edges[::2], edges[1::2], strict=True))


def eval_sequences(examples: list[TokenSequence]) -> list[TokenSequence]:
    """Examples as held-out evaluation sequences (calibration.evaluate / calibration.collect) scoring the
    answer tokens that training would score: collate(answer_only=True) predicts from positions
    max(1, prompt_len - 1) on (position 0 is the attention sink), i.e. tokens from max(2, prompt_len)."""
    out = []
    for e in examples:
        start = max(2, e.start)
        if start < len(e.ids):  # an empty answer has nothing to score
            out.append(scored_sequence(e.ids, start))
    return out


# --- building and batching --------------------------------------------------------------------------
def build_examples(model, cfg, out_dir: Path, *, progress: bool = True) -> list[TokenSequence]:
    """All training examples of a TrainConfig (self-distilled answers generated/cached as needed)."""
    prompts, plain = read_source(cfg.data, per_set=cfg.per_set, limit=cfg.limit)
    tok = model.tokenizer
    examples = [TokenSequence(tok(t, add_special_tokens=True)["input_ids"], 0) for t in plain]
    if prompts:
        if cfg.self_distill:
            cache = Path(cfg.distill_cache) if cfg.distill_cache else out_dir / "distill.jsonl"
            settings = DistillSettings(cfg.gen_max_new_tokens, cfg.gen_batch, cfg.gen_temperature, cfg.gen_seed)
            examples += self_distill(model, prompts, cache, settings, multi_turn=cfg.multi_turn, progress=progress)
        else:
            missing = sum(not p.reference for p in prompts)
            if missing:
                raise ValueError(f"{missing} of {len(prompts)} records have no reference answer; "
                                 "set self_distill = true to answer them with the base model")
            examples += [reference_example(tok, p, cfg.multi_turn) for p in prompts]
    examples = [TokenSequence(e.ids[: cfg.max_len], min(e.start, cfg.max_len),
                              None if e.answer is None else e.answer[: cfg.max_len]) for e in examples]
    examples = [e for e in examples if len(e.ids) >= 3]
    if not examples:
        raise ValueError(f"no usable training sequences in {cfg.data!r}")
    return examples


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor  # (B, T) bool: positions whose next-token distribution is trained
    labels: torch.Tensor  # (B, T) next token at each position (-100 where there is none)


def collate(examples: list[TokenSequence], pad_id: int, answer_only: bool = False) -> Batch:
    """Right-pad: under causal attention, pads after a row's tokens never change its real positions.

    Position t's hidden state predicts token t+1. Masked out: padding, position 0 (the first token's
    state is an attention sink, unlike anything seen while decoding) and, with answer_only, every
    position before the last prompt token (in a conversation: every position that does not predict an
    answer token)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.bool)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        first = max(1, e.start - 1) if answer_only else 1
        mask[b, first:n] = True
        if answer_only and e.answer is not None:  # a conversation: only positions that predict answer tokens
            ans = torch.tensor(e.answer[1:] + e.answer[-1:])  # position t predicts token t+1
            mask[b, :n] &= ans
        labels[b, : n - 1] = ids[b, 1:n]
    return Batch(ids, mask, labels)
