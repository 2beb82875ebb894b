"""Self-distilled multi-turn data: every user turn answered after the model's own earlier answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import exitspec
from conftest import tiny_loaded
from exitspec.decoding.api import encode_prompt
from exitspec.prompts import Prompt, load_prompts, shared_data_dir, to_prompt, tree_user_turns
from exitspec.training import data
from exitspec.training.config import TrainConfig
from exitspec.training.data import DistillSettings, build_examples, chat_ids, collate, draft_corpus, self_distill
from helpers_server import CHAT_TEMPLATE

SETTINGS = DistillSettings(max_new_tokens=5, batch=2)


def _model(template: str | None = CHAT_TEMPLATE):
    m = tiny_loaded("llama")
    m.tokenizer.chat_template = template
    return m


def _mt(users: list[str], i: int = 0) -> Prompt:
    prompt = to_prompt({"question_id": i, "category": "writing", "turns": users}, i, "mt")
    assert prompt is not None
    return prompt


def _count_generated(monkeypatch) -> list[int]:
    """Wrap the generate() self-distillation calls: the number of prompts of each batch."""
    rows: list[int] = []
    real = data.generate

    def counting(model, prompts, **kw):
        rows.append(len(kw["prompt_ids"]))
        return real(model, prompts, **kw)

    monkeypatch.setattr(data, "generate", counting)
    return rows


def _answers(tok, seq) -> str:
    return "".join(tok.decode([t]) for t, a in zip(seq.ids, seq.answer, strict=True) if a)


def test_each_turn_is_answered_after_the_models_own_answers(tmp_path):
    m = _model()
    tok = m.tokenizer
    prompts = [_mt(["hi", "and then?"]), Prompt("solo"), _mt(["abc", "more", "last one"], 2)]
    cache = tmp_path / "d.jsonl"
    seqs = self_distill(m, prompts, cache, SETTINGS, multi_turn=True, progress=False)
    recs = {json.dumps(r.get("turns", r["prompt"])): r for r in map(json.loads, cache.read_text().splitlines()[1:])}

    own1 = exitspec.generate(m, "hi", max_new_tokens=5)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": own1.text},
            {"role": "user", "content": "and then?"}]
    own2 = exitspec.generate(m, conv, max_new_tokens=5)  # same settings, one conversation prompt
    assert recs['["hi", "and then?"]']["answer_ids"] == own2.token_ids[0]
    assert recs['["hi", "and then?"]']["prompt_ids"] == encode_prompt(tok, conv)
    # One sequence: the second user turn follows the model's own first answer; both answers are marked.
    assert tok.decode(seqs[0].ids) == f"<user>hi<assistant>{own1.text}<user>and then?<assistant>{own2.text}"
    assert _answers(tok, seqs[0]) == own1.text + own2.text
    batch = collate([seqs[0]], pad_id=0, answer_only=True)
    trained = [int(batch.labels[0, t]) for t in range(len(seqs[0].ids)) if batch.mask[0, t] and batch.labels[0, t] >= 0]
    assert tok.decode(trained) == own1.text + own2.text  # user turns are context, not targets
    # The single-turn prompt is exactly what it was before: generated ids after the prompt's ids.
    p_ids = chat_ids(tok, "solo")[0]
    assert seqs[1].ids == p_ids + exitspec.generate(m, "solo", max_new_tokens=5).token_ids[0]
    assert seqs[1].start == len(p_ids) and seqs[1].answer is None
    # Three turns: three rounds; the lookup corpus gets each answer, never a user turn.
    assert tok.decode(seqs[2].ids).count("<assistant>") == 3 and '["abc", "more", "last one"]' in recs
    spans = [tok.decode(s) for s in draft_corpus(seqs[:1])]
    assert spans == ["nt>" + own1.text, "nt>" + own2.text]


def test_the_cache_is_reused_and_single_turn_records_are_unchanged(tmp_path, monkeypatch):
    m = _model()
    tok = m.tokenizer
    prompts = [_mt(["hi", "and then?"]), Prompt("solo"), _mt(["abc", "more"], 2), _mt(["hi", "why?"], 3)]
    cache = tmp_path / "d.jsonl"
    rows = _count_generated(monkeypatch)
    first_only = self_distill(m, prompts, cache, SETTINGS, progress=False)  # multi_turn off: as before
    assert sum(rows) == 3  # "hi" is asked twice, answered once
    assert all(s.answer is None for s in first_only)
    assert tok.decode(first_only[0].ids[: first_only[0].start]) == "<user>hi<assistant>"
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    for rec, text in zip(lines[1:], ["hi", "abc", "solo"], strict=True):  # sorted by prompt length
        p_ids = chat_ids(tok, text)[0]
        old = {"prompt": text, "prompt_ids": p_ids,
               "answer_ids": exitspec.generate(m, None, prompt_ids=[p_ids], max_new_tokens=5).token_ids[0]}
        assert rec == old  # the record format of caches made before multi-turn
    # multi_turn on, same cache: the first turns are reused, only the later ones are generated.
    rows.clear()
    multi = self_distill(m, prompts, cache, SETTINGS, multi_turn=True, progress=False)
    assert sum(rows) == 3 and [s.answer is not None for s in multi] == [True, False, True, True]
    assert multi[1] == first_only[1]
    # Everything cached: nothing is generated, the same sequences come back.
    rows.clear()
    again = self_distill(m, prompts, cache, SETTINGS, multi_turn=True, progress=False)
    assert rows == [] and again == multi
    # A record cut by a crash is generated again (a crash loses at most one batch).
    cache.write_text(cache.read_text()[:-20])
    rows.clear()
    assert self_distill(m, prompts, cache, SETTINGS, multi_turn=True, progress=False) == multi and sum(rows) == 1
    with pytest.raises(ValueError, match="other settings"):
        self_distill(m, prompts, cache, DistillSettings(max_new_tokens=6), multi_turn=True, progress=False)


# Builds each conversation but keeps only the LAST assistant turn: earlier prefixes are not prefixes of
# the whole, so the answers cannot be located (conversation_ids gives None).
LAST_REPLY_ONLY = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}<{{ m['role'] }}>"
                   "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("template", [None, LAST_REPLY_ONLY])
def test_without_a_usable_template_only_the_first_turn_is_answered(tmp_path, monkeypatch, template):
    m = _model(template)
    rows = _count_generated(monkeypatch)
    prompts = [_mt(["hi", "and then?"]), Prompt("solo")]
    multi = self_distill(m, prompts, tmp_path / "a.jsonl", SETTINGS, multi_turn=True, progress=False)
    single = self_distill(m, prompts, tmp_path / "b.jsonl", SETTINGS, progress=False)
    assert multi == single and sum(rows) == 4  # no generation spent on a second turn


def test_build_examples_distills_conversations_and_cuts_them_keeping_the_answer_flags(tmp_path):
    m = _model()
    path = tmp_path / "mt.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "turns": [f"q{i}", "go on"]}) + "\n" for i in range(5)))
    cfg = dict(model="tiny", layers=[2], data=str(path), gen_max_new_tokens=5, gen_batch=3,
               distill_cache=str(tmp_path / "d.jsonl"))
    full = build_examples(m, TrainConfig(**cfg), tmp_path, progress=False)
    assert len(full) == 4 and all(e.answer is not None for e in full)  # the train split, all distilled
    cut = build_examples(m, TrainConfig(**cfg, max_len=20), tmp_path, progress=False)
    for f, c in zip(full, cut, strict=True):
        assert c.ids == f.ids[:20] and c.answer == f.answer[:20] and c.start == min(f.start, 20)
    flat = build_examples(m, TrainConfig(**cfg, multi_turn=False), tmp_path, progress=False)
    assert all(e.answer is None and "go on" not in m.tokenizer.decode(e.ids) for e in flat)


def test_user_turns_of_each_format():
    tree = {"text": "q1", "role": "prompter", "replies": [
        {"text": "a1", "role": "assistant", "replies": [
            {"text": "gone", "role": "prompter", "deleted": True, "replies": []},
            {"text": "q2", "role": "prompter", "replies": [
                {"text": "a2", "role": "assistant", "replies": [{"text": "q3", "role": "prompter"}]}]}]},
        {"text": "other a1", "role": "assistant", "replies": [{"text": "not this", "role": "prompter"}]}]}
    oa = to_prompt({"message_tree_id": "t", "prompt": tree}, 0, "oasst")
    assert oa is not None and oa.text == "q1" and oa.user_turns == ["q1", "q2", "q3"] and oa.turns is None
    assert tree_user_turns({"text": "q", "role": "prompter", "replies": []}) == ["q"]
    leaf = to_prompt({"prompt": {"text": "q", "role": "prompter", "replies": [{"text": "a", "role": "assistant"}]}},
                     0, "")
    assert leaf is not None and leaf.user_turns is None  # one user turn: single-turn
    # ShareGPT: the user turns include a last one nobody answered; `turns` (answered ones) is unchanged.
    conv = [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}]
    sg = to_prompt({"conversations": conv}, 0, "")
    assert sg is not None and sg.user_turns == ["q1", "q2"] and sg.turns is None and sg.reference == "a1"
    mt = _mt(["first", "second", "", "after an empty turn"])
    assert mt.text == "first" and mt.user_turns == ["first", "second"] and mt.turns is None
    assert _mt(["only"]).user_turns is None and Prompt("x").user_turns is None


def test_the_shared_open_assistant_trees_give_their_reply_chains():
    root = shared_data_dir()
    path = Path(root or "") / "oasst_sample" / "en_100_tree.jsonl"
    if root is None or not path.is_file():
        pytest.skip("../shared/data/oasst_sample is not beside this checkout")
    prompts = load_prompts(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [p.text for p in prompts] == [r["prompt"]["text"] for r in records]
    multi = [p for p in prompts if p.user_turns]
    assert multi and all(p.user_turns[0] == p.text and len(p.user_turns) > 1 for p in multi)
