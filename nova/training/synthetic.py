"""A small synthetic retrieval task that a random-weight model cannot solve but a LoRA can learn.

Queries are made of "query words", relevant passages of the *paired* "passage words" (a fixed random
bijection) plus filler words. Query and passage share no token, so a random model, whose mean-pooled
vectors mostly measure token overlap, ranks near chance; a fine-tuned adapter has to learn the word
pairing. Held-out queries are new combinations of the same words, so what is learnt generalizes.

``python -m nova.training.synthetic OUT_DIR`` writes ``OUT_DIR/train.jsonl`` (triplets with hard
negatives), ``OUT_DIR/eval`` (a BEIR dataset of held-out queries) and ``OUT_DIR/train-beir`` (a BEIR
view of the training queries).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from nova.evaluation.dataset import write_beir

WORDS = (
    "apple river stone cloud music garden window paper silver forest candle bridge mirror ocean pencil rabbit "
    "basket castle dragon engine feather guitar hammer island jacket kettle ladder marble needle orange pepper "
    "rocket saddle tiger umbrella violin wagon yellow anchor blanket cotton desert eagle ginger harbor iron "
    "jungle kitten lemon nickel olive quartz ribbon shadow thunder velvet walnut copper bottle button camera "
    "carpet cherry circle coffee dinner doctor dollar finger flower hunter lizard market monkey number object "
    "planet pocket puzzle silk summer tunnel valley winter wolf"
).split()


def make_task(
    out_dir: str | Path,
    *,
    pairs: int = 30,
    words_per_query: int = 2,
    fillers: int = 2,
    train_queries: int = 240,
    eval_queries: int = 60,
    distractors: int = 120,
    hard_negatives: int = 3,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the task; returns the paths of ``train`` (JSONL), ``eval`` and ``train_beir`` (BEIR folders)."""
    rng = random.Random(seed)
    vocab = list(WORDS)
    rng.shuffle(vocab)
    need = 2 * pairs + 8
    if need > len(vocab):
        raise ValueError(f"at most {(len(vocab) - 8) // 2} pairs")
    query_words = vocab[:pairs]
    passage_words = vocab[pairs : 2 * pairs]
    filler_words = vocab[2 * pairs : 2 * pairs + 8]
    partner = dict(zip(query_words, passage_words, strict=True))

    combos = list(itertools.combinations(range(pairs), words_per_query))
    rng.shuffle(combos)
    if train_queries + eval_queries > len(combos):
        raise ValueError(f"only {len(combos)} distinct queries exist; ask for fewer")
    train_combos = combos[:train_queries]
    eval_combos = combos[train_queries : train_queries + eval_queries]

    def passage(combo, r: random.Random) -> str:
        words = [partner[query_words[i]] for i in combo] + r.sample(filler_words, fillers)
        r.shuffle(words)
        return " ".join(words)

    def query(combo, r: random.Random) -> str:
        words = [query_words[i] for i in combo]
        r.shuffle(words)
        return " ".join(words)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "eval": out / "eval", "train_beir": out / "train-beir"}

    trained = set(train_combos)
    with paths["train"].open("w", encoding="utf-8") as handle:
        for combo in train_combos:
            # hard negatives: passages sharing all but one word with the positive, and never another training
            # query's answer (which would teach that query its own answer is wrong whenever both share a batch)
            negatives = []
            for _ in range(hard_negatives):
                position = rng.randrange(len(combo))
                choices = [i for i in range(pairs) if i not in combo
                           and tuple(sorted(combo[:position] + (i,) + combo[position + 1:])) not in trained]
                if not choices:
                    raise ValueError("too many training queries: some hard negative would answer another one; "
                                     "ask for fewer")
                swapped = list(combo)
                swapped[position] = rng.choice(choices)
                negatives.append(passage(swapped, rng))
            record = {"query": query(combo, rng), "positive": passage(combo, rng), "negatives": negatives}
            handle.write(json.dumps(record) + "\n")

    def beir(folder: Path, chosen, prefix: str) -> None:
        corpus, queries, qrels = [], [], {}
        for n, combo in enumerate(chosen):
            corpus.append({"_id": f"{prefix}d{n}", "title": "", "text": passage(combo, rng)})
            queries.append({"_id": f"{prefix}q{n}", "text": query(combo, rng)})
            qrels[f"{prefix}q{n}"] = {f"{prefix}d{n}": 1}
        taken = set(chosen)
        others = [c for c in combos if c not in taken]
        for n in range(distractors):
            combo = rng.choice(others)
            corpus.append({"_id": f"{prefix}x{n}", "title": "", "text": passage(combo, rng)})
        write_beir(folder, corpus, queries, qrels)

    beir(paths["eval"], eval_combos, "e")
    beir(paths["train_beir"], train_combos[:eval_queries], "t")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--train-queries", type=int, default=240)
    parser.add_argument("--eval-queries", type=int, default=60)
    args = parser.parse_args(argv)
    paths = make_task(args.out_dir, seed=args.seed, pairs=args.pairs, train_queries=args.train_queries,
                      eval_queries=args.eval_queries)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
