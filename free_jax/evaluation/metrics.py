"""Task metrics with the standard scorers: ROUGE (rouge-score), BLEU (sacreBLEU), SQuAD EM/F1.

`score(metric, predictions, references)` returns a dict whose `"score"` entry is the task's headline
number (ROUGE-L sum, corpus BLEU, or SQuAD F1), all on a 0-100 scale.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

METRICS = ("rouge", "bleu", "squad")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences_per_line(text: str) -> str:
    # ROUGE-Lsum treats newlines as sentence boundaries; a plain regex avoids nltk's data download.
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures x100 (stemmed, as the summarisation papers report)."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_per_line(ref), _sentences_per_line(pred))
        for k in keys:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    out = {k: 100.0 * v / n for k, v in totals.items()}
    out["score"] = out["rougeLsum"]
    return out


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus sacreBLEU (13a tokenisation, the WMT default) with one reference per example."""
    import sacrebleu

    result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {"bleu": float(result.score), "score": float(result.score)}


def _normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    pred_tokens = _normalize_answer(prediction).split()
    truth_tokens = _normalize_answer(truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
    """Exact match and token F1 x100, each the max over an example's reference answers."""
    em = f1 = 0.0
    for pred, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        em += max(float(_normalize_answer(pred) == _normalize_answer(r)) for r in refs)
        f1 += max(_f1(pred, r) for r in refs)
    n = max(len(predictions), 1)
    return {"em": 100.0 * em / n, "f1": 100.0 * f1 / n, "score": 100.0 * f1 / n}


def has_repetition_loop(text: str, max_n: int = 4, repeats: int = 3) -> bool:
    """True when some word n-gram (n <= max_n) occurs `repeats` times back to back.

    >>> has_repetition_loop("Eingabe Eingabe Eingabe"), has_repetition_loop("a b a b c")
    (True, False)
    """
    words = text.split()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n * repeats + 1):
            gram = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def loop_rate(predictions: Sequence[str]) -> float:
    """Fraction of outputs with a repetition loop (the degenerate-model symptom)."""
    if not predictions:
        return 0.0
    return sum(has_repetition_loop(p) for p in predictions) / len(predictions)


def score(metric: str, predictions: Sequence[str], references: Sequence) -> dict[str, float]:
    """Dispatches on the task's metric name ("rouge", "bleu" or "squad")."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references for metric {metric!r}"
        )
    fns = {"rouge": rouge, "bleu": bleu, "squad": squad}
    if metric not in fns:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    return fns[metric](predictions, references)
