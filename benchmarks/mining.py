"""Report-mining benchmark: free text vs Open-i's MeSH `<major>` indexing as gold.

The headline is the held-out half of the reports (seeded; the rules were developed on the other
half), scored on indexed reports only (a report marked `No Indexing` has no gold, not an empty
one), for the 14 ChestX-ray14 findings Open-i indexes + `normal`, and for ChestX-ray8's 8 findings
+ `normal`, the label set of the published figures (Wang et al. 2017, Table 1: their miner
P .90 R .91 F1 .90; MetaMap .84/.88/.86). Beside `cxr.reports.text.TextMiner` (medspaCy: synonyms +
ConText negation and uncertainty), in the same run and timed alike (build, then label every
report), two baselines with the same synonym lists: NegEx-style negation (Chapman et al. 2001:
trigger phrases, a scope to the sentence's end or a termination term) and plain keywords (no
negation). A
report is `normal` for a baseline when it asserts nothing. The development half, all indexed
reports and all reports (unindexed ones counted with empty gold, as a flattering comparison
would) are reported too.

    python benchmarks/mining.py [--reports NLMCXR_reports.tgz] [--json OUT] [--examples 3]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import CxrError  # noqa: E402
from cxr.machine import cpu_name  # noqa: E402
from cxr.fetch import locate  # noqa: E402
from dataclasses import replace  # noqa: E402

from cxr.metrics import (  # noqa: E402
    CHESTXRAY8_TO_MESH, context_accuracy, markdown_table, precision_recall_f1,
)
from cxr.reports.text import (  # noqa: E402
    NORMAL, OPENI_EVAL_LABELS, TextMiner, label_of, load_rules, report_labels,
)
from cxr.sources.openi import read_openi  # noqa: E402

REFERENCES = {  # Wang et al. 2017 (ChestX-ray8), Table 1, Open-i reports against MeSH
    "ChestX-ray8 miner (published)": {"precision": 0.90, "recall": 0.91, "f1": 0.90},
    "MetaMap (published)": {"precision": 0.84, "recall": 0.88, "f1": 0.86},
}
DEV_SEED = 0  # the seed of the half the rules were developed on; do not change after tuning
CHESTXRAY8_LABELS = (*CHESTXRAY8_TO_MESH.values(), NORMAL)
HEADLINE = "held-out half, indexed"
HEADLINE_8 = "held-out half, indexed, ChestX-ray8's 8 labels + normal"


def split_halves(ids: list[str], seed: int = DEV_SEED) -> tuple[set[str], set[str]]:
    """(development half, held-out half) of the report ids, seeded."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return set(order[:half]), set(order[half:])


class KeywordBaseline:
    """Naive keyword matching: any mention of a synonym asserts the disease, negated or not."""

    def __init__(self, rules: dict):
        import spacy
        from spacy.matcher import Matcher, PhraseMatcher

        self.nlp = spacy.blank("en")
        self.phrases = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        self.patterns = Matcher(self.nlp.vocab)
        for concept in rules["concepts"]:
            words = {p.lower() for p in concept.get("phrases", ())}
            words |= {w + "s" for w in words if not w.endswith("s")}
            diseases = [concept["disease"], *concept.get("also", ())]
            for disease in diseases:
                self.phrases.add(disease, [self.nlp.make_doc(w) for w in sorted(words)])
                if concept.get("patterns"):
                    self.patterns.add(disease, concept["patterns"])

    def asserted(self, doc, start: int, end: int) -> bool:
        return True

    def labels(self, reports: list[dict], sections=("FINDINGS", "IMPRESSION")) -> list[set[str]]:
        texts = [" ".join(r.get(s) or "" for s in sections) for r in reports]
        out = []
        for doc in self.nlp.pipe(texts, batch_size=256):
            matches = [*self.phrases(doc), *self.patterns(doc)]
            found = {self.nlp.vocab.strings[m] for m, start, end in matches
                     if self.asserted(doc, start, end)}
            labels = {label_of(d) for d in found} & set(OPENI_EVAL_LABELS)
            if doc.text.strip() and not found:
                labels.add(NORMAL)
            out.append(labels)
        return out


class NegexBaseline(KeywordBaseline):
    """The same keywords, minus mentions NegEx calls negated: a negation trigger before the mention
    (or a post-negation trigger after it) in the same sentence, with no termination term between
    (Chapman et al. 2001; the scope runs to the sentence's end, as in NegEx's later versions,
    not five words: Open-i's lists "no consolidation, pneumothorax, or pleural effusion" are long)."""

    PRE = ("no", "not", "without", "denies", "negative for", "no evidence of", "no sign of",
           "no signs of", "free of", "absence of", "rule out", "ruled out", "no new",
           "resolution of", "resolved")
    POST = ("ruled out", "unlikely", "not seen", "not identified", "not present", "not visualized",
            "absent", "resolved", "has resolved", "have resolved", "free")
    TERMINATE = {"but", "however", "although", "though", "except", "apart", "aside", "yet", "which"}

    def __init__(self, rules: dict):
        super().__init__(rules)
        self.nlp.add_pipe("sentencizer")
        self.pre = [tuple(t.split()) for t in self.PRE]
        self.post = [tuple(t.split()) for t in self.POST]

    def _scope(self, tokens) -> list[str]:
        """The words up to a termination term."""
        words = []
        for token in tokens:
            if token.lower_ in self.TERMINATE:
                break
            words.append(token.lower_)
        return words

    def asserted(self, doc, start: int, end: int) -> bool:
        sent = doc[start].sent
        before = self._scope(reversed(doc[sent.start:start]))[::-1]
        after = self._scope(doc[end:sent.end])
        negated = any(tuple(before[i:i + len(t)]) == t for t in self.pre for i in range(len(before)))
        negated |= any(tuple(after[i:i + len(t)]) == t for t in self.post for i in range(len(after)))
        return not negated


def context_agreement(studies, mined) -> dict:
    """Side / location / severity of the text findings against the MeSH terms' qualifiers, for
    the evaluation labels both sources assert in a report (`cxr.metrics.context_accuracy`)."""
    wanted = set(OPENI_EVAL_LABELS) - {NORMAL}

    def folded(findings):
        return [replace(f, disease=label_of(f.disease)) for f in findings
                if label_of(f.disease) in wanted and f.certainty == "positive"]

    pairs = []
    for study, found in zip(studies, mined):
        true, pred = folded(study.findings), folded(found)
        both = {f.disease for f in true} & {f.disease for f in pred}
        pairs.append(([f for f in true if f.disease in both],
                      [f for f in pred if f.disease in both]))
    return context_accuracy(pairs)


def disagreements(studies, gold, pred, mined, label: str, n: int) -> dict:
    """Up to n reports where text and MeSH disagree on `label`, with the sentences involved."""
    out = {"text_only": [], "mesh_only": []}
    for study, g, p, findings in zip(studies, gold, pred, mined):
        kind = "text_only" if label in p and label not in g else (
            "mesh_only" if label in g and label not in p else None)
        if kind and len(out[kind]) < n:
            out[kind].append({
                "id": study.id, "mesh": study.meta.get("mesh", []),
                "sentences": sorted({f.sentence for f in findings
                                     if label_of(f.disease) == label and f.sentence}),
                "text": {s: study.report.get(s, "") for s in ("FINDINGS", "IMPRESSION")},
            })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", help="NLMCXR_reports.tgz or a folder of Open-i XML "
                    "(default: the data cache, see `cxr fetch openi-reports`)")
    ap.add_argument("--json", type=Path, help="write all figures here")
    ap.add_argument("--examples", type=int, default=2,
                    help="disagreements kept per label and direction in the JSON")
    args = ap.parse_args(argv)

    path = locate("openi/NLMCXR_reports.tgz", args.reports)
    studies = read_openi(path)
    dev, held_out = split_halves([s.id for s in studies])
    indexed = {s.id for s in studies if s.labelled}
    gold = [report_labels(s.findings) for s in studies]
    reports = [s.report for s in studies]
    n = len(studies)

    # every predictor timed alike: building it (load), then labelling all reports
    speed = {"reports": n}
    t0 = time.perf_counter()
    miner = TextMiner()
    speed["miner_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mined = list(miner.mine_many(reports))
    speed["miner_reports_per_s"] = n / (time.perf_counter() - t0)
    predictions = {"miner": [report_labels(f) for f in mined]}
    for name, cls in (("negex", NegexBaseline), ("keyword", KeywordBaseline)):
        t0 = time.perf_counter()
        predictor = cls(load_rules())
        speed[f"{name}_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        predictions[name] = predictor.labels(reports)
        speed[f"{name}_reports_per_s"] = n / (time.perf_counter() - t0)
    uncertain = [report_labels(f, include_uncertain=True) for f in mined]

    def scored(ids, labels=OPENI_EVAL_LABELS, rows=None):
        keep = [i for i, s in enumerate(studies) if s.id in ids]
        pick = lambda xs: [xs[i] & set(labels) for i in keep]  # noqa: E731
        sets = rows or predictions
        out = {name: precision_recall_f1(pick(gold), pick(p), labels) for name, p in sets.items()}
        out["reports"] = len(keep)
        out["positives"] = {lab: sum(lab in g for g in pick(gold)) for lab in labels}
        out["positives_all_labels"] = sum(out["positives"].values())
        return out

    everything = {s.id for s in studies}
    results = {
        HEADLINE: scored(held_out & indexed),
        HEADLINE_8: scored(held_out & indexed, CHESTXRAY8_LABELS),
        "development half, indexed": scored(dev & indexed),
        "all indexed": scored(indexed),
        "all reports, unindexed ones as empty gold": scored(everything),
        "held-out half, indexed, uncertain counted positive": scored(
            held_out & indexed, rows={"miner": uncertain}),
    }
    unindexed = everything - indexed
    normal_fp = [s.id for s, g, p in zip(studies, gold, predictions["miner"])
                 if NORMAL in p and NORMAL not in g]
    no_indexing = {"reports": len(unindexed),
                   "normal_false_positives_all_reports": len(normal_fp),
                   "of_them_unindexed": sum(i in unindexed for i in normal_fp)}
    context = context_agreement(studies, mined)

    head, head8 = results[HEADLINE], results[HEADLINE_8]
    rows = []
    for lab in OPENI_EVAL_LABELS:
        v = head["miner"]["per_label"][lab]
        rows.append([lab, v["tp"] + v["fn"], v["precision"], v["recall"], v["f1"],
                     results["development half, indexed"]["miner"]["per_label"][lab]["f1"],
                     head["negex"]["per_label"][lab]["f1"], head["keyword"]["per_label"][lab]["f1"]])
    for name, res in (("**micro, 14 labels + normal**", head), ("**micro, ChestX-ray8's 8 + normal**", head8)):
        m = res["miner"]["micro"]
        rows.append([name, m["tp"] + m["fn"], m["precision"], m["recall"], m["f1"], None,
                     res["negex"]["micro"]["f1"], res["keyword"]["micro"]["f1"]])
    for name, ref in REFERENCES.items():
        rows.append([name, None, ref["precision"], ref["recall"], ref["f1"], None, None, None])
    table = markdown_table(
        ["label (Open-i MeSH heading)", "reports", "P", "R", "F1", "F1 development half",
         "NegEx baseline F1", "keyword baseline F1"], rows)
    runs = markdown_table(
        ["reports scored", "reports", "miner micro F1", "NegEx micro F1", "keyword micro F1"],
        [[k, v["reports"], v["miner"]["micro"]["f1"], v.get("negex", {}).get("micro", {}).get("f1"),
          v.get("keyword", {}).get("micro", {}).get("f1")] for k, v in results.items()])
    context_table = markdown_table(
        ["context field (text vs MeSH qualifier)", "findings where MeSH states it", "accuracy"],
        [[f, v["n"], v["accuracy"]] for f, v in context["fields"].items()]
        + [["all three fields equal", context["n_matched"], context["exact"]]])
    print(f"## Report mining on Open-i: the held-out half, indexed reports "
          f"({head['reports']:,} of {n:,}; gold = MeSH <major> terms)\n")
    print(table)
    print()
    print(runs)
    print()
    print(context_table)
    print()
    print(f"Speed, {cpu_name()}, one process: "
          + ", ".join(f"{k} {speed[f'{k}_reports_per_s']:.0f} reports/s (load {speed[f'{k}_load_s']:.1f} s)"
                      for k in predictions))
    print(f"{no_indexing['reports']} reports are marked No Indexing; on all reports "
          f"{no_indexing['of_them_unindexed']} of the miner's {no_indexing['normal_false_positives_all_reports']} "
          "`normal` false positives are such reports.")

    if args.json:
        examples = {lab: disagreements(studies, gold, predictions["miner"], mined, lab, args.examples)
                    for lab in OPENI_EVAL_LABELS}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "benchmark": "mining", "labels": list(OPENI_EVAL_LABELS),
            "chestxray8_labels": list(CHESTXRAY8_LABELS), "dev_seed": DEV_SEED,
            "headline": HEADLINE, "results": results, "no_indexing": no_indexing,
            "context": context, "speed": speed, "references": REFERENCES,
            "disagreements": examples, "table_markdown": table,
        }, indent=1))
        tmp.replace(args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CxrError as exc:
        print(f"mining benchmark: error: {exc}", file=sys.stderr)
        sys.exit(2)
