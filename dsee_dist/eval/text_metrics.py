"""Scores of free-text outputs against one or more references per input (any task, not only E2E): corpus BLEU
and chrF as sacrebleu computes them (its default 13a tokenisation; a varying number of references per input),
ROUGE-L (pycocoevalcap's: the LCS F-measure with beta 1.2 over lower-cased whitespace tokens, the best
reference per input, averaged over inputs), and exact match (the share of outputs equal to one of their references
after stripping)."""

from __future__ import annotations

TEXT_METRICS = ("BLEU", "chrF", "ROUGE_L", "exact_match")


def normalize_text_metric_names(names) -> tuple[str, ...]:
    from dsee_dist.errors import DSEEError

    by_lower = {m.lower(): m for m in TEXT_METRICS}
    by_lower.update({"rouge-l": "ROUGE_L", "rougel": "ROUGE_L", "rouge": "ROUGE_L", "em": "exact_match"})
    out = []
    for name in names:
        if name.strip().lower() not in by_lower:
            raise DSEEError(f"unknown metric '{name}' for free text; choose from {', '.join(TEXT_METRICS)}")
        out.append(by_lower[name.strip().lower()])
    return tuple(out)


def rouge_l(hyp: str, refs: list[str]) -> float:
    """pycocoevalcap's ROUGE_L of one output (lower-cased; whitespace tokens)."""
    from pycocoevalcap.rouge.rouge import Rouge

    return float(Rouge().calc_score([hyp.lower()], [r.lower() for r in refs]))


def score_text(hyps: list[str], refs: list[list[str]], metrics=TEXT_METRICS) -> dict[str, float]:
    """Corpus scores (BLEU and chrF on sacrebleu's 0-100 scale; ROUGE_L and exact_match in [0, 1])."""
    import sacrebleu

    width = max(len(g) for g in refs)
    streams = [[g[i] if i < len(g) else None for g in refs] for i in range(width)]
    scores: dict[str, float] = {}
    for name in metrics:
        if name == "BLEU":
            scores[name] = sacrebleu.corpus_bleu(hyps, streams).score
        elif name == "chrF":
            scores[name] = sacrebleu.corpus_chrf(hyps, streams).score
        elif name == "ROUGE_L":
            scores[name] = sum(rouge_l(h, g) for h, g in zip(hyps, refs)) / len(hyps)
        elif name == "exact_match":
            scores[name] = sum(h.strip() in {r.strip() for r in g} for h, g in zip(hyps, refs)) / len(hyps)
    return scores
