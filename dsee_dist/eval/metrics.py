"""The five E2E NLG figures, computed as the official E2E scorer (tuetschek/e2e-metrics) computes them.

- BLEU: sacrebleu, 13a tokenisation, on text lowercased as mteval-v13a lowercases (ASCII A-Z only);
  closest reference length, mteval's smoothing; a variable number of references per MR.
- NIST: mteval-v13a's NIST (5-grams, information weights from the whole reference corpus, matches
  clipped by the largest count in any reference of the MR, length penalty against the average
  reference length), on sacrebleu's 13a tokens and n-gram counts. NLTK's `corpus_nist` is not used:
  it scores every output against its single best reference and gives 6.22 instead of the official
  7.82 on the scorer's own example.
- METEOR (1.5, with its paraphrase table), ROUGE-L and CIDEr: pycocoevalcap, the packaged copy of
  the COCO caption code the official scorer ships, on the same Stanford PTB tokenisation (lowercased,
  punctuation removed). All of these need Java. Without it METEOR is reported unavailable and ROUGE-L and
  CIDEr are computed on a Python stand-in for the PTB tokeniser (13a plus PTB's clitic split; measured
  within 0.001 ROUGE-L and 0.01 CIDEr of the official figures on the shipped checks).

BLEU, METEOR and ROUGE-L are on the 0-1 scale the official scorer prints.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
from collections import Counter

from dsee_dist.errors import DSEEError

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
JAVA_HINT = "install Java (Debian/Ubuntu: apt-get install default-jre-headless)"
NIST_ORDER = 5
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")


def find_java() -> str | None:
    return shutil.which("java")


def normalize_metric_names(names) -> tuple[str, ...]:
    by_lower = {m.lower(): m for m in METRICS}
    by_lower.update({"rouge-l": "ROUGE_L", "rougel": "ROUGE_L", "rouge": "ROUGE_L"})
    out = []
    for name in names:
        key = name.strip().lower()
        if key not in by_lower:
            raise DSEEError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
        out.append(by_lower[key])
    return tuple(m for m in METRICS if m in out)


# ------------------------------------------------------------------------------ BLEU and NIST (mteval-v13a)


def _mteval_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def compute_bleu(hyps: list[str], refs: list[list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    depth = max(len(g) for g in refs)
    streams = [[_mteval_lower(g[i]) if i < len(g) else None for g in refs] for i in range(depth)]
    score = BLEU(lowercase=False, tokenize="13a").corpus_score([_mteval_lower(h) for h in hyps], streams)
    return score.score / 100.0


def _nist_length_penalty(ratio: float) -> float:
    """mteval-v13a: 1 at or above the average reference length, 0.5 at two thirds of it."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(ratio) ** 2)


def compute_nist(hyps: list[str], refs: list[list[str]], max_order: int = NIST_ORDER) -> float:
    from sacrebleu.metrics.helpers import extract_all_word_ngrams
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    ref_counts = [[extract_all_word_ngrams(tokenize(_mteval_lower(r)), 1, max_order) for r in g] for g in refs]
    corpus, total_words = Counter(), 0
    for group in ref_counts:
        for counts, length in group:
            corpus.update(counts)
            total_words += length

    def info(ngram: tuple) -> float:  # bits of information: log2(count(prefix) / count(ngram))
        prefix_count = corpus[ngram[:-1]] if len(ngram) > 1 else total_words
        return math.log2(prefix_count / corpus[ngram])

    matched_info = [0.0] * (max_order + 1)
    hyp_ngrams = [0] * (max_order + 1)
    ref_words = num_refs = 0
    for hyp, group in zip(hyps, ref_counts):
        counts, length = extract_all_word_ngrams(tokenize(_mteval_lower(hyp)), 1, max_order)
        best = Counter()
        for ref, _ in group:
            best |= ref  # elementwise max over the MR's references
        for ngram, count in counts.items():
            if ngram in best:
                matched_info[len(ngram)] += info(ngram) * min(count, best[ngram])
        for n in range(1, max_order + 1):
            hyp_ngrams[n] += max(length - n + 1, 0)
        ref_words += sum(ref_length for _, ref_length in group)
        num_refs += len(group)
    score = sum(matched_info[n] / max(hyp_ngrams[n], 1) for n in range(1, max_order + 1))
    average_ref_length = ref_words / (num_refs / len(hyps))
    return score * _nist_length_penalty(hyp_ngrams[1] / average_ref_length)


# ------------------------------------------------------------------------------ COCO caption metrics


def _ptb_tokenize_java(java: str, sentences: list[str]) -> list[str]:
    """The official scorer's tokenisation: Stanford PTBTokenizer (CoreNLP 3.4.1, shipped in pycocoevalcap),
    lowercased, one line per sentence, the COCO punctuation list removed. Reads stdin, so nothing is written
    into the installed package."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(s.replace("\n", " ") for s in sentences)
    proc = subprocess.run(
        [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"],
        input=text,
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    if proc.returncode != 0:
        raise DSEEError(f"the PTB tokenizer (java) failed: {proc.stderr.strip().splitlines()[-1:]}")
    lines = proc.stdout.split("\n")
    lines += [""] * (len(sentences) - len(lines))  # trailing empty sentences leave no line
    if len(lines) != len(sentences):
        raise DSEEError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    punctuation = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punctuation) for line in lines]


def _ptb_tokenize_python(sentences: list[str]) -> list[str]:
    """Stand-in for the PTB tokenizer when Java is missing: 13a tokens, PTB's clitic split, lowercased,
    the same punctuation removed."""
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    punctuation = set(ptb.PUNCTUATIONS) | {"(", ")", '"'}
    out = []
    for s in sentences:
        tokens = _CLITIC.sub(r" \1", tokenize(s.lower())).split()
        out.append(" ".join(w for w in tokens if w not in punctuation))
    return out


class _Meteor:
    """pycocoevalcap's METEOR 1.5 process (`java -jar meteor-1.5.jar - - -stdio -l en -norm`), started early
    (loading its paraphrase table takes ~15 s) and closed explicitly."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor

        self._scorer = Meteor()

    def score(self, gts: dict, res: dict) -> float:
        try:
            value, _ = self._scorer.compute_score(gts, res)
        except (ValueError, OSError) as e:  # the JVM died (no memory, broken Java): its output stopped
            raise DSEEError(f"METEOR (java) failed: {e}; check that `java -jar` runs ({JAVA_HINT})") from None
        return float(value)

    def close(self) -> None:
        proc = self._scorer.meteor_p
        if proc.poll() is None:
            proc.stdin.close()
            proc.kill()
            proc.wait()


class E2EScorer:
    """Scores outputs against grouped references. Reuse one scorer to start METEOR's JVM once."""

    def __init__(self, metrics=METRICS, java: str | None = "auto"):
        self.metrics = normalize_metric_names(metrics)
        self.java = find_java() if java == "auto" else java
        self._meteor: _Meteor | None = None
        self.unavailable: dict[str, str] = {}
        if "METEOR" in self.metrics:
            if self.java is None:
                self.unavailable["METEOR"] = f"METEOR needs Java, which was not found: {JAVA_HINT}"
            else:
                self._meteor = _Meteor()  # the JVM loads while the other metrics are computed

    @property
    def tokenizer(self) -> str:
        if self.java:
            return "Stanford PTBTokenizer (java), as the official scorer"
        return "13a + PTB clitic split (Python stand-in: Java not found; may differ slightly from the official scorer)"

    def score(self, hyps: list[str], refs: list[list[str]]) -> dict[str, float | None]:
        if len(hyps) != len(refs):
            raise DSEEError(f"{len(hyps)} outputs for {len(refs)} MRs: give one output per MR")
        if not hyps:
            raise DSEEError("nothing to score: no MRs")
        if any(not g for g in refs):
            raise DSEEError("every MR needs at least one reference")
        hyps = [h.strip() for h in hyps]
        scores: dict[str, float | None] = {}
        if "BLEU" in self.metrics:
            scores["BLEU"] = compute_bleu(hyps, refs)
        if "NIST" in self.metrics:
            scores["NIST"] = compute_nist(hyps, refs)
        coco = [m for m in ("METEOR", "ROUGE_L", "CIDEr") if m in self.metrics]
        if coco:
            flat_refs = [r for g in refs for r in g]
            if self.java:
                tokens = _ptb_tokenize_java(self.java, flat_refs + hyps)
            else:
                tokens = _ptb_tokenize_python(flat_refs + hyps)
            gts, res, pos = {}, {}, 0
            for i, g in enumerate(refs):
                gts[i], pos = tokens[pos : pos + len(g)], pos + len(g)
            for i in range(len(hyps)):
                res[i] = [tokens[len(flat_refs) + i]]
            if "ROUGE_L" in coco:
                from pycocoevalcap.rouge.rouge import Rouge

                scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
            if "CIDEr" in coco:
                from pycocoevalcap.cider.cider import Cider

                scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
            if "METEOR" in coco:
                scores["METEOR"] = self._meteor.score(gts, res) if self._meteor is not None else None
        return {m: scores[m] for m in self.metrics}

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> E2EScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score_e2e(hyps: list[str], refs: list[list[str]], metrics=METRICS) -> dict[str, float | None]:
    """One-shot scoring (starts and stops METEOR's JVM when METEOR is asked for)."""
    with E2EScorer(metrics) as scorer:
        return scorer.score(hyps, refs)
