"""Report-mining benchmark: free text vs Open-i's MeSH `<major>` indexing as gold.

For the 14 ChestX-ray14 findings Open-i indexes and `normal`, per-label and micro precision,
recall and F1 of `cxr.reports.text.TextMiner` (medspaCy: synonyms + ConText negation and
uncertainty) on all reports, and separately on the two seeded halves of the reports: the
development half the rules were tuned on and the held-out half they never saw. In the same run,
the baseline: a naive keyword matcher with the same synonym lists and no negation/uncertainty
(a report is `normal` when it mentions nothing), so the value of ConText shows. The published
reference is ChestX-ray8's miner on Open-i (Wang et al. 2017: P .90 R .91 F1 .90; MetaMap
.84/.88/.86).

    python benchmarks/mining.py [--reports NLMCXR_reports.tgz] [--json OUT] [--examples 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr.errors import CxrError  # noqa: E402
from cxr.fetch import locate  # noqa: E402
from dataclasses import replace  # noqa: E402

from cxr.metrics import context_accuracy, markdown_table, precision_recall_f1  # noqa: E402
from cxr.reports.text import (  # noqa: E402
    NORMAL, OPENI_EVAL_LABELS, TextMiner, label_of, load_rules, report_labels,
)
from cxr.sources.openi import read_openi  # noqa: E402

REFERENCES = {  # Wang et al. 2017 (ChestX-ray8), Table 1, Open-i reports against MeSH
    "ChestX-ray8 miner (published)": {"precision": 0.90, "recall": 0.91, "f1": 0.90},
    "MetaMap (published)": {"precision": 0.84, "recall": 0.88, "f1": 0.86},
}
DEV_SEED = 0  # the seed of the half the rules were developed on; do not change after tuning


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

    def labels(self, reports: list[dict], sections=("FINDINGS", "IMPRESSION")) -> list[set[str]]:
        texts = [" ".join(r.get(s) or "" for s in sections) for r in reports]
        out = []
        for doc in self.nlp.pipe(texts, batch_size=256):
            found = {self.nlp.vocab.strings[m] for m, _, _ in self.phrases(doc)}
            found |= {self.nlp.vocab.strings[m] for m, _, _ in self.patterns(doc)}
            labels = {label_of(d) for d in found} & set(OPENI_EVAL_LABELS)
            if doc.text.strip() and not found:
                labels.add(NORMAL)
            out.append(labels)
        return out


def score(gold: list[set[str]], pred: list[set[str]]) -> dict:
    return precision_recall_f1(gold, pred, OPENI_EVAL_LABELS)


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
    gold = [report_labels(s.findings) for s in studies]

    t0 = time.perf_counter()
    miner = TextMiner()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mined = list(miner.mine_many([s.report for s in studies]))
    mine_s = time.perf_counter() - t0
    pred = [report_labels(f) for f in mined]
    pred_unc = [report_labels(f, include_uncertain=True) for f in mined]

    t0 = time.perf_counter()
    baseline = KeywordBaseline(load_rules())
    base_pred = baseline.labels([s.report for s in studies])
    base_s = time.perf_counter() - t0

    def subset(rows, ids):
        return [r for s, r in zip(studies, rows) if s.id in ids]

    results = {
        "all": score(gold, pred),
        "development half": score(subset(gold, dev), subset(pred, dev)),
        "held-out half": score(subset(gold, held_out), subset(pred, held_out)),
        "uncertain counted positive": score(gold, pred_unc),
        "keyword baseline": score(gold, base_pred),
    }
    n = len(studies)
    speed = {"reports": n, "miner_load_s": load_s, "miner_reports_per_s": n / mine_s,
             "baseline_reports_per_s": n / base_s}

    context = context_agreement(studies, mined)
    ours, base = results["all"], results["keyword baseline"]
    rows = []
    for lab in OPENI_EVAL_LABELS:
        v, b = ours["per_label"][lab], base["per_label"][lab]
        h = results["held-out half"]["per_label"][lab]
        rows.append([lab, v["tp"] + v["fn"], v["precision"], v["recall"], v["f1"], h["f1"],
                     b["precision"], b["recall"], b["f1"]])
    m, b, h = ours["micro"], base["micro"], results["held-out half"]["micro"]
    rows.append(["**micro average**", m["tp"] + m["fn"], m["precision"], m["recall"], m["f1"],
                 h["f1"], b["precision"], b["recall"], b["f1"]])
    for name, ref in REFERENCES.items():
        rows.append([name, None, ref["precision"], ref["recall"], ref["f1"], None, None, None,
                     None])
    table = markdown_table(
        ["label (Open-i MeSH heading)", "reports", "P", "R", "F1", "F1 held-out",
         "keyword P", "keyword R", "keyword F1"], rows)
    sizes = {"development half": len(dev), "held-out half": len(held_out)}
    halves = markdown_table(
        ["run", "reports", "micro P", "micro R", "micro F1"],
        [[k, sizes.get(k, n), v["micro"]["precision"], v["micro"]["recall"], v["micro"]["f1"]]
         for k, v in results.items()])
    context_table = markdown_table(
        ["context field (text vs MeSH qualifier)", "findings where MeSH states it", "accuracy"],
        [[f, v["n"], v["accuracy"]] for f, v in context["fields"].items()]
        + [["all three fields equal", context["n_matched"], context["exact"]]])
    print(f"## Report mining on Open-i ({n:,} reports; gold = MeSH <major> terms)\n")
    print(table)
    print()
    print(halves)
    print()
    print(context_table)
    print()
    print(f"Speed: {speed['miner_reports_per_s']:.0f} reports/s for the medspaCy miner "
          f"(load {load_s:.1f} s), {speed['baseline_reports_per_s']:.0f} reports/s for the "
          f"keyword baseline; {platform.processor() or platform.machine()}, one process.")

    if args.json:
        examples = {lab: disagreements(studies, gold, pred, mined, lab, args.examples)
                    for lab in OPENI_EVAL_LABELS}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "reports": str(path), "labels": list(OPENI_EVAL_LABELS), "dev_seed": DEV_SEED,
            "results": results, "context": context, "speed": speed, "references": REFERENCES,
            "disagreements": examples, "table_markdown": table,
        }, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CxrError as exc:
        print(f"mining benchmark: error: {exc}", file=sys.stderr)
        sys.exit(2)
