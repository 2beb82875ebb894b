"""Questions the default model writes itself, and its greedy answers: the second run of the shipped
lookahead head's training (benchmarks/README.md, 'src/exitspec/heads/lookahead.py').

    python benchmarks/lookahead/self_questions.py 8 questions.json

For each of the topics below, `per_topic` questions sampled at T = 1 from "Write one question that a person
might ask an AI assistant about {topic}" (48 tokens, seeded per batch), deduplicated and kept between 15
and 300 characters, then answered greedily (int4 weights, 128 tokens, EOS ends an answer). Written as JSON
records {"prompt", "prompt_ids", "answer_ids"}. No public prompt set is read: the questions are the
model's own, which is why they may train a drafter that is measured on a source it never saw.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import exitspec
from exitspec.decoding.api import encode_prompt

TOPICS = [
    "cooking", "baking bread", "gardening", "houseplants", "dogs", "cats", "birds", "fishing", "hiking", "camping",
    "travel in Europe", "travel in Asia", "budget travel", "learning a language", "grammar", "writing an essay",
    "writing a poem", "writing a story", "job interviews", "resumes", "careers", "starting a business", "marketing",
    "personal finance", "saving money", "investing", "taxes", "renting an apartment", "buying a house",
    "home repair", "cleaning", "furniture", "interior design", "fashion", "skin care", "fitness", "running", "yoga",
    "weight loss", "nutrition", "vegetarian food", "sleep", "stress", "meditation", "friendship", "relationships",
    "parenting", "babies", "teenagers", "school", "university", "studying for exams", "math homework", "physics",
    "chemistry", "biology", "astronomy", "space travel", "climate change", "weather", "oceans", "volcanoes",
    "dinosaurs", "evolution", "genetics", "medicine", "the common cold", "vaccines", "dentists", "mental health",
    "history of Rome", "ancient Egypt", "the Middle Ages", "World War II", "the French Revolution", "philosophy",
    "ethics", "religion", "mythology", "art history", "painting", "drawing", "photography", "music theory",
    "learning guitar", "piano", "classical music", "pop music", "movies", "television", "video games",
    "board games", "chess", "sports", "football", "basketball", "tennis", "the Olympics", "cars", "electric cars",
    "bicycles", "airplanes", "trains", "computers", "smartphones", "the internet", "social media", "privacy online",
    "cybersecurity", "programming", "Python", "JavaScript", "databases", "artificial intelligence", "robots",
    "machine learning", "mathematics puzzles", "statistics", "economics", "inflation", "politics", "elections",
    "law", "human rights", "volunteering", "charity", "environment", "recycling", "energy", "solar power",
    "electricity", "plumbing", "woodworking", "knitting", "sewing", "pets", "horses", "farming", "wine", "coffee",
    "tea", "chocolate", "holidays", "birthdays", "weddings", "gift ideas", "etiquette", "public speaking",
    "negotiation", "time management", "productivity", "motivation", "leadership", "teamwork", "customer service",
    "emails", "translation", "jokes", "riddles", "trivia", "geography", "countries", "cities",
    "languages of the world", "linguistics", "psychology", "sociology", "anthropology", "architecture", "bridges",
    "engineering",
]


def main(per_topic: int, out_path: str) -> None:
    torch.set_num_threads(2)
    m = exitspec.load("default", weights="int4")
    asks = [f"Write one question that a person might ask an AI assistant about {t}. Reply with the question only."
            for t in TOPICS for _ in range(per_topic)]
    t0 = time.time()
    questions: list[str] = []
    for i in range(0, len(asks), 32):
        out = exitspec.generate(m, asks[i:i + 32], max_new_tokens=48, temperature=1.0, seed=i)
        questions += [q.strip().strip('"').strip() for q in out.texts]
    questions = [q for q in dict.fromkeys(questions) if 15 <= len(q) <= 300]
    print(f"{len(TOPICS)} topics, {len(questions)} questions, {time.time() - t0:.0f} s", flush=True)
    records = []
    for i in range(0, len(questions), 32):
        batch = questions[i:i + 32]
        out = exitspec.generate(m, batch, max_new_tokens=128)
        for q, ids in zip(batch, out.token_ids, strict=True):
            records.append({"prompt": q, "prompt_ids": encode_prompt(m.tokenizer, q), "answer_ids": ids})
    print(f"{len(records)} answers, {time.time() - t0:.0f} s", flush=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
