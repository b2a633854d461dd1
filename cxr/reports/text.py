"""Free-text report mining: FINDINGS / IMPRESSION sentences -> Findings with certainty and context.

medspaCy does the work: spaCy's sentencizer splits sentences, a medspaCy TargetMatcher finds
disease mentions from the synonym lists in `text_rules.json` (data, not code), and ConText
decides whether each mention is negated ("no pleural effusion", "clear of"), uncertain ("cannot
exclude pneumonia", "may represent") or hypothetical ("recommend CT to exclude mass"). Context
words (side, lobe/zone, severity) are ConText modifiers too, each given to the nearest disease
mention in its phrase; a mention left without side or site takes the sentence's nearest one, and
coordinated mentions ("atelectasis or scarring") share theirs.

Open-i's indexers code both sides of a differential ("atelectasis versus scarring": both) and
"probable"/"likely" findings as present; the rules follow them, so "versus", "or", "probable" are
no uncertainty cues here, while "may", "possible", "cannot exclude", "questionable" are.

A mined Finding's `disease` is the Open-i MeSH heading (`Pulmonary Atelectasis`, `Hernia, Hiatal`,
`Lung/hypoinflation`, ...), so text and MeSH findings can be compared and merged. A report whose
text asserts nothing abnormal gets one `normal` Finding, as Open-i's indexers write it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache
from pathlib import Path

from ..errors import CxrError
from ..records import Finding

RULES_PATH = Path(__file__).with_name("text_rules.json")
SECTIONS = ("FINDINGS", "IMPRESSION")
NORMAL = "normal"
_CONTEXT_FIELDS = ("side", "location", "severity")
_MODIFIER_CATEGORY = {f: f"CXR_{f.upper()}" for f in _CONTEXT_FIELDS}
_CERTAINTY_ORDER = {"positive": 2, "uncertain": 1, "negative": 0}
# Open-i text glues sentences ("effusion.There") and doubles periods ("effusion.. Right");
# the sentencizer needs one period and a space to split there.
_GLUED_SENTENCE = re.compile(r"(?<=[a-z\)])\.+(?=[A-Z])|\.{2,}")


def load_rules(rules: str | Path | Mapping | None = None) -> dict:
    """The miner's vocabulary: a dict, a JSON path, or None for the bundled `text_rules.json`."""
    if isinstance(rules, Mapping):
        return dict(rules)
    path = Path(rules) if rules is not None else RULES_PATH
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrError("rules file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrError(f"rules file is not valid JSON: {exc}", path) from None
    for key in ("concepts", "context", "modifiers"):
        if key not in data:
            raise CxrError(f"rules file lacks the {key!r} section", path)
    return data


def _phrase_variants(phrase: str) -> list[str]:
    """The phrase and its plural (last word + 's'), so the lists need only singulars."""
    phrase = " ".join(phrase.lower().split())
    if phrase.endswith("s") or not phrase[-1:].isalpha():
        return [phrase]
    return [phrase, phrase + "s"]


def _silence_pyrush() -> None:
    """medspaCy's PyRuSH logs every sentence at DEBUG through loguru when it is loaded; mining
    4,000 reports must stay quiet whichever components a caller enables."""
    try:
        from loguru import logger

        logger.disable("PyRuSH")
    except ImportError:  # loguru comes with PyRuSH; without it there is nothing to silence
        pass


def build_pipeline(rules: Mapping):
    """A medspaCy pipeline (sentencizer, TargetMatcher, ConText) configured from `rules`."""
    _silence_pyrush()
    import medspacy
    from medspacy.context import ConTextRule
    from medspacy.target_matcher import TargetRule

    # spaCy's rule sentencizer, not PyRuSH: Open-i sentences end in periods, and PyRuSH takes
    # ~90% of the pipeline's time (measured: 10.7 s of 11.9 s on 400 reports) for the same splits.
    nlp = medspacy.load(medspacy_enable=["medspacy_target_matcher", "medspacy_context"])
    nlp.add_pipe("sentencizer", first=True)
    matcher = nlp.get_pipe("medspacy_target_matcher")
    target_rules = []
    for concept in rules["concepts"]:
        meta = {"organ": concept.get("organ")}
        seen = set()
        for phrase in concept.get("phrases", ()):
            for variant in _phrase_variants(phrase):
                if variant not in seen:
                    seen.add(variant)
                    target_rules.append(TargetRule(variant, concept["disease"], metadata=meta))
        for i, pattern in enumerate(concept.get("patterns", ())):
            target_rules.append(
                TargetRule(f"{concept['disease']}#{i}", concept["disease"], pattern=pattern,
                           metadata=meta))
    matcher.add(target_rules)

    context = nlp.get_pipe("medspacy_context")
    drop = {s.lower() for s in rules.get("context_drop", ())}
    kept = [r for r in context.rules if r.literal.lower() not in drop]
    context_rules = []
    for r in rules["context"]:
        context_rules.append(ConTextRule(
            r["literal"], r["category"], pattern=r.get("pattern"),
            direction=r.get("direction", "BIDIRECTIONAL"), max_scope=r.get("max_scope"),
            max_targets=r.get("max_targets")))
    scope = int(rules.get("modifier_scope", 6))
    for literal, fields in rules["modifiers"].items():
        # One rule per context word; its category is the first field it sets, the metadata
        # carries all of them ("bibasilar" -> side bilateral + location base).
        category = _MODIFIER_CATEGORY[next(iter(fields))]
        context_rules.append(ConTextRule(
            literal, category, direction="BIDIRECTIONAL", max_scope=scope, max_targets=1,
            metadata=dict(fields), on_modifies=_same_phrase))
    # Replace the rule set: ConText has no remove(), so rebuild its matcher from a fresh pipe.
    nlp.remove_pipe("medspacy_context")
    context = nlp.add_pipe("medspacy_context", config={"rules": None})
    context.add(kept + context_rules)
    return nlp


_PHRASE_BREAKS = frozenset({"and", ",", ";", "with", "but", "or", "versus", "vs", "while", "."})


def _same_phrase(target, modifier, between) -> bool:
    """A context word describes a finding in its own phrase: "small left effusion and right
    basilar atelectasis" gives `right` to the atelectasis, not across the `and`."""
    return not any(t.lower_ in _PHRASE_BREAKS for t in between)


@lru_cache(maxsize=4)
def _cached_pipeline(rules_key: str):
    return build_pipeline(json.loads(rules_key))


def _certainty(span) -> str:
    # A hypothetical mention ("recommend CT to exclude mass") is a question, even if negated.
    if span._.is_hypothetical:
        return "uncertain"
    if span._.is_negated:
        return "negative"
    if span._.is_uncertain:
        return "uncertain"
    return "positive"


def _context_of(span) -> dict:
    """Side / location / severity of a mention: ConText modifiers first, then the words inside
    the mention itself ("heart is mildly enlarged")."""
    found: dict[str, object] = {"side": None, "location": [], "severity": None}
    doc = span.doc

    def add(fields: Mapping) -> None:
        for key, value in fields.items():
            if key == "location":
                if value not in found["location"]:
                    found["location"].append(value)
            elif found[key] is None:
                found[key] = value

    for modifier in span._.modifiers:
        if modifier.category in _MODIFIER_CATEGORY.values() and modifier.rule.metadata:
            add(modifier.rule.metadata)
    words = doc.user_data.get("cxr_modifier_words", {})
    for token in span:
        if token.lower_ in words:
            add(words[token.lower_])
    if found["side"] is None or not found["location"]:
        _sentence_fallback(span, found)
    if found["side"] == "left" and "middle lobe" in found["location"]:
        # The left lung has no middle lobe: "left midlung" is the lingula, as Open-i indexes it.
        found["location"] = ["lingula" if x == "middle lobe" else x for x in found["location"]]
    return found


_COORDINATORS = frozenset({"or", "and", "/", "versus", "vs", "vs.", ",", "and/or"})


def _coordinated(first, second) -> bool:
    """True for "X or Y", "X/Y", "X versus Y", "X and/or Y": two findings named as one."""
    between = second.doc[first.end:second.start]
    return (first.sent.start == second.sent.start and 0 < len(between) <= 3
            and all(t.lower_ in _COORDINATORS for t in between))


def _sentence_fallback(span, found: dict) -> None:
    """Side and site the sentence states elsewhere ("opacity in the left base, XXXX represents
    atelectasis or scarring" -> atelectasis left base), as Open-i's indexers read it: the
    nearest context word of the sentence (one after the mention only when it describes no other
    finding), one before the mention winning a tie."""
    sent = span.sent
    candidates = []
    for modifier in span.doc._.context_graph.modifiers:
        start, end = modifier.modifier_span
        if modifier.category not in _MODIFIER_CATEGORY.values() or not modifier.rule.metadata:
            continue
        if modifier.num_targets and start >= span.end:
            continue  # a later word that already describes a later finding is not ours
        if start < sent.start or end > sent.end:
            continue
        before = end <= span.start
        distance = span.start - end if before else start - span.end
        candidates.append((distance, not before, modifier.rule.metadata))
    for _, _, fields in sorted(candidates, key=lambda c: (c[0], c[1])):
        if found["side"] is None and fields.get("side"):
            found["side"] = fields["side"]
        if not found["location"] and fields.get("location"):
            found["location"].append(fields["location"])


class TextMiner:
    """Mine Open-i style report text into Findings.

    >>> miner = TextMiner()
    >>> [(f.disease, f.certainty, f.side) for f in miner.mine("Small left pleural effusion.")]
    [('Pleural Effusion', 'positive', 'left')]

    `mine` takes a report as `{section: text}` (only `sections` are read, FINDINGS and IMPRESSION
    by default) or a plain string; `mine_many` streams many reports through `nlp.pipe`.
    """

    def __init__(self, rules: str | Path | Mapping | None = None,
                 sections: Iterable[str] = SECTIONS, add_normal: bool = True):
        self.rules = load_rules(rules)
        self.sections = tuple(s.upper() for s in sections)
        self.add_normal = add_normal
        self.nlp = _cached_pipeline(json.dumps(self.rules, sort_keys=True))
        self._organs = {}
        self._also: dict[str, tuple[str, ...]] = {}
        for concept in self.rules["concepts"]:
            self._organs.setdefault(concept["disease"], concept.get("organ"))
            for phrase in concept.get("phrases", ()) if concept.get("also") else ():
                for variant in _phrase_variants(phrase):
                    self._also[variant] = tuple(concept.get("also", ()))
        self._modifier_words = {k.lower(): v for k, v in self.rules["modifiers"].items()
                                if " " not in k}

    # -- text handling -------------------------------------------------------------------
    def texts_of(self, report: Mapping[str, str] | str) -> list[str]:
        """The section texts the miner reads, cleaned for sentence splitting."""
        if isinstance(report, str):
            texts = [report]
        else:
            upper = {str(k).upper(): v for k, v in report.items()}
            texts = [upper.get(s) or "" for s in self.sections]
        return [_GLUED_SENTENCE.sub(". ", " ".join(t.split())) for t in texts if t and t.strip()]

    def findings_of_doc(self, doc) -> list[Finding]:
        doc.user_data["cxr_modifier_words"] = self._modifier_words
        out = []
        previous = None  # (span, context) of the mention before, for coordinated findings
        for span in doc.ents:
            ctx = _context_of(span)
            if previous is not None and _coordinated(previous[0], span):
                # "mild bibasilar infiltrates versus atelectasis": both are mild and bibasilar.
                for key in ("side", "severity"):
                    ctx[key] = ctx[key] or previous[1][key]
                ctx["location"] = ctx["location"] or list(previous[1]["location"])
            previous = (span, ctx)
            certainty = _certainty(span)
            sentence = span.sent.text.strip()
            # A phrase may assert more than one heading ("calcified nodule": Nodule + Calcinosis).
            for disease in (span.label_, *self._also.get(span.text.lower(), ())):
                out.append(Finding(
                    disease=disease, organ=self._organs.get(disease),
                    location=tuple(ctx["location"]), side=ctx["side"], severity=ctx["severity"],
                    certainty=certainty, raw=span.text, sentence=sentence, source="text"))
        return out

    def _finish(self, findings: list[Finding], any_text: bool) -> list[Finding]:
        if self.add_normal and any_text and not any(
                f.certainty == "positive" for f in findings):
            findings.append(Finding(disease=NORMAL, certainty="positive", source="text"))
        return findings

    # -- public API ----------------------------------------------------------------------
    def mine(self, report: Mapping[str, str] | str) -> list[Finding]:
        """Findings of one report, in text order (one per mention, negated ones included)."""
        return next(self.mine_many([report]))

    def mine_many(self, reports: Iterable[Mapping[str, str] | str],
                  batch_size: int = 128) -> Iterator[list[Finding]]:
        """Findings per report, in order; all section texts go through one `nlp.pipe` stream."""
        reports = iter(reports)
        pending: list[int] = []  # number of texts of each report not yet yielded

        def texts() -> Iterator[str]:
            for report in reports:
                parts = self.texts_of(report)
                pending.append(len(parts))
                yield from parts

        current: list[Finding] = []
        for doc in self.nlp.pipe(texts(), batch_size=batch_size):
            while pending[0] == 0:  # reports without text come before this doc's report
                pending.pop(0)
                yield self._finish([], any_text=False)
            current.extend(self.findings_of_doc(doc))
            pending[0] -= 1
            if pending[0] == 0:
                pending.pop(0)
                yield self._finish(current, any_text=True)
                current = []
        for _ in pending:  # trailing reports without text
            yield self._finish([], any_text=False)


def summarise(findings: Iterable[Finding]) -> dict[str, str]:
    """Report-level certainty per disease: any positive mention wins, then uncertain."""
    out: dict[str, str] = {}
    for f in findings:
        best = out.get(f.disease)
        if best is None or _CERTAINTY_ORDER[f.certainty] > _CERTAINTY_ORDER[best]:
            out[f.disease] = f.certainty
    return out


def asserted(findings: Iterable[Finding], include_uncertain: bool = False) -> set[str]:
    """Diseases a report asserts (positive; uncertain too when asked)."""
    ok = {"positive", "uncertain"} if include_uncertain else {"positive"}
    return {d for d, c in summarise(findings).items() if c in ok}


# -- scoring against Open-i's MeSH indexing ----------------------------------------------------
# The ChestX-ray14 findings Open-i indexes (cxr.reports.mesh.NIH_TO_MESH) plus `normal`. Open-i's
# indexers wrote lung emphysema under two headings, `Emphysema` and `Pulmonary Emphysema`; both
# count as `Emphysema` (Subcutaneous / Mediastinal / Bullous Emphysema are other headings).
OPENI_EVAL_LABELS = (
    "Pulmonary Atelectasis", "Cardiomegaly", "Pleural Effusion", "Infiltrate", "Mass", "Nodule",
    "Pneumonia", "Pneumothorax", "Consolidation", "Pulmonary Edema", "Emphysema",
    "Pulmonary Fibrosis", "Hernia, Hiatal", "Thickening", NORMAL,
)
HEADING_ALIASES = {"Pulmonary Emphysema": "Emphysema"}


def label_of(disease: str) -> str:
    """The evaluation label of a disease heading (aliases folded, `Heading/change` kept)."""
    return HEADING_ALIASES.get(disease, disease)


def report_labels(findings: Iterable[Finding], labels: Iterable[str] = OPENI_EVAL_LABELS,
                  include_uncertain: bool = False) -> set[str]:
    """The labels a report is positive for, from MeSH or text Findings alike."""
    wanted = set(labels)
    return {label_of(d) for d in asserted(findings, include_uncertain)} & wanted
