"""How good is a trained run? `evaluate_run(RUN)` (the library behind `cxr evaluate`).

Runs the run's `Reader` over one split of its data (by default the run's own data source and its
stored patient split) and writes `metrics.json` and `metrics.md` (also printed):

- study level: ROC AUC of the abnormal probability, and sensitivity, specificity, PPV, NPV of the
  normal/abnormal call at the run's stored operating point (abnormal = any finding);
- detection: ROC AUC per target and mean; PPV (precision), sensitivity (recall), specificity and
  F1 of the reported findings at the stored operating thresholds; top-1 accuracy of a one-pattern
  (shin2016) run, as Shin et al. report it;
- annotation: BLEU-1..4 on train/val/test for the model before the cascade (RUN/stage1) and after
  (RUN), as Shin et al. 2016 report it; twice: "given disease" (the RNN writes the sequence of
  each true finding, conditioned on its disease: the annotator alone) and "end to end" (the
  sequence of each detected finding against all true sequences of its image);
- context: accuracy of side, location and severity of detected findings, where the truth states
  them (the phantom's complete terms, Open-i MeSH terms), and of the words written for every true
  finding when the annotator is told its disease (`context.given_disease`: paired across runs);
- localisation: ChestX-ray8 accuracy at T(IoBB) and T(IoU) in {0.1, 0.25, 0.5, 0.75, 0.9}
  against the boxes the source provides, with the CAM of the true disease (Wang et al.'s
  protocol) and with what the Reader outputs (boxes of detected findings only); for a grounded
  run also one table per other source (the finding map, the finding word's attention), each at
  T(IoBB) and T(IoU), and a summary naming the best source at T(IoBB) = 0.5;
- calibration: ECE and reliability-diagram data of the calibrated scores; the thresholds in use.

Published figures (Wang et al., ChestX-ray8, CVPR 2017: `cxr.metrics.WANG2017_*`) sit beside
ours where the labels match.
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics as M
from .atomic import write_atomic
from .errors import CxrError
from .records import Box, Study
from .report_html import Table
from .runspec import RunSpec

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------ the data
class EvalData:
    """The run's view of a data source: which images, their split, truth labels, findings, boxes."""

    def __init__(self, spec: RunSpec, studies: list[Study]):
        import dataclasses

        from .training.prepare import finding_sequences, prepare

        self.lookup = target_lookup(list(spec.targets))
        # another source's names for the run's targets (NIH "Effusion" = Open-i "Pleural Effusion")
        studies = [dataclasses.replace(s, findings=[
            dataclasses.replace(f, disease=self.lookup.get(f.disease.lower(), f.disease))
            for f in s.findings]) for s in studies]
        self.prep = prepare(studies, spec.data.views, patient_split=spec.data.patients,
                            targets=list(spec.targets), words=list(spec.vocabulary),
                            label_space="shin2016" if spec.architecture.head == "softmax" else "diseases")
        self.targets = self.prep.targets
        by_image = {}
        for s in studies:
            for im in s.images:
                by_image[(s.id, im.id)] = (s, im)
        self.studies = [by_image[(sid, iid)][0]
                        for sid, iid in zip(self.prep.study_ids, self.prep.image_ids)]
        self.images = [by_image[(sid, iid)][1]
                       for sid, iid in zip(self.prep.study_ids, self.prep.image_ids)]
        # true annotation sequences per (image, target): what the RNN was trained to write
        self.sequences: dict[tuple[int, int], list[list[str]]] = defaultdict(list)
        for i, t, tokens in self.prep.pairs:
            self.sequences[(i, t)].append(list(tokens))
        self.image_sequences = [[list(tok) for _, tok in finding_sequences(s)] for s in self.studies]

    def indices(self, split: str, max_images: int | None = None) -> np.ndarray:
        idx = np.arange(len(self.prep.paths)) if split == "all" else self.prep.indices(split)
        return idx[:max_images] if max_images else idx

    def truth_findings(self, i: int) -> list:
        """Positive findings of image i whose disease is a target (what the model can detect)."""
        names = {t.lower() for t in self.targets if t != "normal"}
        return [f for f in self.studies[i].positive if f.disease.lower() in names]

    def truth_boxes(self, i: int) -> list[Box]:
        """Boxes of image i relabelled with the target they belong to (boxes of other labels
        are dropped)."""
        out = []
        for b in self.images[i].boxes:
            target = self.lookup.get(box_disease(b.label).lower())
            if target:
                out.append(Box(target, b.x, b.y, b.w, b.h))
        return out


def target_lookup(targets: list[str]) -> dict[str, str]:
    """Lower-cased disease name -> target, including the NIH and Open-i MeSH names of the same
    finding, so a run trained on one source can be scored on the other."""
    from .reports.mesh import MESH_TO_NIH, NIH_TO_MESH

    out = {t.lower(): t for t in targets}
    for a, b in [*NIH_TO_MESH.items(), *MESH_TO_NIH.items()]:
        if b in targets and a.lower() not in out:
            out[a.lower()] = b
    return out


def box_disease(label: str) -> str:
    """The disease a box label names: a MeSH term's heading ('Opacity/lung/base/left' ->
    'Opacity'; the phantom labels boxes with terms), or the label itself (NIH)."""
    if "/" not in label:
        return label
    from .reports.mesh import parse_term

    return parse_term(label).disease or label


# -------------------------------------------------------------------------- model outputs
class Outputs:
    """A Reader's results over some images of an EvalData, computed once per (model, split)."""

    def __init__(self, reader, data: EvalData, idx: np.ndarray, batch_size: int, beams: int,
                 progress: bool, desc: str):
        from tqdm.auto import tqdm

        self.reader, self.idx = reader, idx
        self._given = None  # `given_disease`, made when first asked for
        self.results = []
        bar = tqdm(total=len(idx), desc=desc, unit="img", disable=not progress, leave=False,
                   file=sys.stderr)
        for s in range(0, len(idx), batch_size):
            chunk = [data.prep.paths[i] for i in idx[s:s + batch_size]]
            self.results.extend(reader(chunk, heatmaps=False, beams=beams, batch_size=batch_size))
            bar.update(len(chunk))
        bar.close()
        targets = data.targets
        self.scores = np.array([[r.scores[t] for t in targets] for r in self.results],
                               dtype=np.float64).reshape(len(idx), len(targets))
        self.embeddings = np.stack([r.embedding for r in self.results]) if self.results else None


# ---------------------------------------------------------------------------- the metrics
def given_disease(out: Outputs, data: EvalData, beams: int) -> tuple[list[tuple[int, int]], list[list[str]]]:
    """The annotation the reader writes for every true (image, disease) pair of `out`'s images,
    told the disease (computed once per Outputs): what BLEU and the context fields "given the
    disease" score, paired on the same findings whatever a model detects."""
    import torch

    if out._given is not None:
        return out._given
    rows = {int(i): k for k, i in enumerate(out.idx)}
    pairs = sorted((i, t) for (i, t) in data.sequences if i in rows)
    hyps: list[list[str]] = []
    if pairs and out.embeddings is not None and getattr(out.reader, "ground", None) is not None:
        # the grounded annotator writes from the feature maps: run the CNN again, 32 images a time
        from .images import load_image

        images = sorted({i for i, _ in pairs})
        for s in range(0, len(images), 32):
            chunk = images[s:s + 32]
            where = {i: j for j, i in enumerate(chunk)}
            maps = out.reader.forward([load_image(data.prep.paths[i]) for i in chunk]).maps
            sel = [(i, t) for i, t in pairs if i in where]
            hyps += out.reader.annotate(torch.zeros(len(sel), 1), torch.tensor([t for _, t in sel]),
                                        maps=maps[[where[i] for i, _ in sel]])
    elif pairs and out.embeddings is not None:
        emb = torch.from_numpy(out.embeddings[[rows[i] for i, _ in pairs]])
        labels = torch.tensor([t for _, t in pairs], dtype=torch.long)
        for s in range(0, len(pairs), 256):
            hyps += out.reader.annotate(emb[s:s + 256], labels[s:s + 256], beams)
    out._given = (pairs, hyps)
    return out._given


def _context_given_disease(out: Outputs, data: EvalData, beams: int) -> dict | None:
    """Context accuracy of the words the reader writes when told each true disease of each image
    (`given_disease`): side, site and grade read on every true finding, not only on those a model
    happens to detect, so two runs are compared on the same findings."""
    from .reports.mesh import annotation_term

    pairs, hyps = given_disease(out, data, beams)
    if not pairs:
        return None
    said: dict[int, list] = defaultdict(list)
    for (i, t), toks in zip(pairs, hyps):
        said[i].append(annotation_term(data.targets[t], toks))
    return M.context_accuracy((data.truth_findings(i), said.get(int(i), [])) for i in out.idx)


def _bleu(out: Outputs, data: EvalData, vocabulary: Sequence[str], beams: int) -> dict:
    """BLEU given the true disease, and end to end (detected findings vs the image's truth)."""
    pairs, hyps = given_disease(out, data, beams)
    given = {"n": 0}
    if pairs:
        refs = [data.sequences[p] for p in pairs]
        given = M.bleu_scores(refs, [M.annotation_tokens(h, vocabulary) for h in hyps])
    refs, hyps = [], []
    for k, i in enumerate(out.idx):
        for f in out.results[k].findings:
            refs.append(data.image_sequences[i])
            hyps.append(M.annotation_tokens(f.annotation, vocabulary))
    return {"given_disease": given, "end_to_end": M.bleu_scores(refs, hyps)}


def _detection(out: Outputs, data: EvalData, y: np.ndarray, thresholds: dict) -> dict:
    from .operating import confusion

    gold = [{t for t, v in zip(data.targets, row) if v > 0} for row in y]
    pred = [{f.disease for f in r.findings} for r in out.results]
    prf = M.precision_recall_f1(gold, pred, labels=data.targets)
    for k, t in enumerate(data.targets):
        c = confusion(y[:, k], [t in p for p in pred])
        prf["per_label"][t].update(sensitivity=c["sensitivity"], specificity=c["specificity"], ppv=c["ppv"])
    return {"thresholds": {t: thresholds.get(t) for t in data.targets}, **prf}


def _study(out: Outputs, data: EvalData, y: np.ndarray, gate) -> dict | None:
    """The study-level answer against the truth (abnormal = not normal): AUC of `abnormal`, the
    call's sensitivity/specificity/PPV/NPV, and `normal` recall (normal studies reported normal)."""
    from .operating import OperatingPoint, abnormal_truth, best_specificity, confusion

    if gate is None:
        return None
    truth = abnormal_truth(y, data.targets) > 0
    prob = np.array([r.abnormal for r in out.results], dtype=np.float64)
    called = np.array([r.call == "abnormal" for r in out.results])
    both = 0 < truth.sum() < len(truth)
    auc = M.auc_per_label(truth[:, None].astype(float), prob[:, None], ["abnormal"])["mean"] if both else None
    normal_reported = np.array([any(f.disease == "normal" for f in r.findings) for r in out.results])
    return {"operating_point": gate.operating_point, "threshold": gate.threshold, "signal": gate.signal,
            "auc": auc, "abnormal": int(truth.sum()), "normal": int((~truth).sum()),
            **confusion(truth, called),
            "normal_recall": float(normal_reported[~truth].mean()) if (~truth).any() else None,
            "best_specificity_at_target": (
                best_specificity(truth, prob, OperatingPoint.parse(gate.operating_point).value)
                if gate.operating_point.startswith("sensitivity") else None),
            "validation": gate.validation}


def _top1(out: Outputs, y: np.ndarray) -> float | None:
    """Share of images whose highest-scoring pattern is theirs (one-pattern runs only)."""
    if out.reader.spec.architecture.head != "softmax" or len(y) == 0:
        return None
    return float((out.scores.argmax(1) == y.argmax(1)).mean())


def map_sources(reader) -> tuple[str, ...]:
    """The maps a run's boxes can come from: the CAM, and the grounded annotator's two maps
    where the run has one (`Reader.SOURCES`)."""
    return tuple(reader.SOURCES) if getattr(reader, "ground", None) is not None else ("cam",)


def boxes_of_true_diseases(reader, image, truth: Sequence[Box], source: str = "cam",
                           boxes=None) -> list[Box]:
    """ChestX-ray8's protocol on one image: the boxes `reader.localise` finds for every disease
    the image has a true box of, from map `source` by rule `boxes` (default: the run's), in the
    diseases' name order: what `cxr.metrics.localisation_accuracy` pairs with `truth`."""
    labels = sorted({b.label for b in truth})
    found = reader.localise(image, labels, source=source, boxes=boxes)
    return [b for t in labels for b in found[t]]


def _localisation(out: Outputs, data: EvalData, progress: bool) -> dict | None:
    from tqdm.auto import tqdm

    from .images import load_image

    with_boxes = [(k, i) for k, i in enumerate(out.idx) if data.truth_boxes(i)]
    if not with_boxes:
        return None
    sources = map_sources(out.reader)
    given: dict[str, list] = {src: [] for src in sources}
    detected = []
    for k, i in tqdm(with_boxes, desc="localising", unit="img", disable=not progress, leave=False,
                     file=sys.stderr):
        truth = data.truth_boxes(i)
        image = load_image(data.prep.paths[i])
        for src in sources:
            given[src].append((truth, boxes_of_true_diseases(out.reader, image, truth, src)))
        detected.append((truth, out.results[k].boxes))
    per_source = {src: M.localisation_accuracy(given[src]) for src in sources}
    best = max(sources, key=lambda src: per_source[src]["iobb"]["mean"]["0.5"] or 0.0)
    return {"protocol_given_disease": per_source["cam"], "sources": per_source, "best_source": best,
            "reader_output": M.localisation_accuracy(detected),
            "reader_box_source": getattr(out.reader, "box_source", "cam"),
            "n_images": len(with_boxes)}


# the map a run's detected findings get their boxes from (`LocalizeParams.source`), in words
BOX_SOURCE_TITLES = {"cam": "class activation map", "attention": "grounded finding map",
                     "word": "grounded annotator's map while writing the finding's word"}

# how each localisation source is named in tables
SOURCE_TITLES = {
    "cam": "CAM of the true disease (ChestX-ray8 protocol)",
    "attention": "grounded annotator's finding map (image branch taught by report cross-attention)",
    "word": "grounded annotator's attention while writing the finding's word",
}


def evaluate_run(run: str | Path, data: str | None = None, split: str = "test",
                 out: str | Path | None = None, bleu_splits: Sequence[str] = SPLITS,
                 batch_size: int = 32, beams: int = 1, device: str | None = None,
                 max_images: int | None = None, progress: bool = True,
                 studies: list[Study] | None = None) -> dict:
    """Evaluate a run (see the module docstring); writes OUT/metrics.json and OUT/metrics.md and
    returns the metrics dict. `studies` skips reading the source again (the demo has them)."""
    from .checkpoint import load_spec
    from .reader import Reader
    from .reports.labels import study_terms

    t0 = time.time()
    run = Path(run).expanduser()
    run_spec = load_spec(run)
    spec = data or run_spec.data.spec
    if studies is None:
        if not spec:
            raise CxrError("the run does not record its data source; give --data SOURCE[:PATH]", run)
        from .sources import open_source

        studies = open_source(spec)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    truth = "the source's labels"
    if run_spec.label_mining is not None and not any(study_terms(s) for s in studies):
        # a run trained on report text, on data with no labels of its own: score it against the
        # labels mined from the reports, as it was trained (and say so)
        from .reports.report_labels import label_studies

        studies, _ = label_studies(studies, run_spec.label_mining.uncertain)
        truth = "labels mined from the reports (the data has no labels of its own)"
        say(f"scoring against {truth}")
    ed = EvalData(run_spec, studies)
    idx = ed.indices(split, max_images)
    if len(idx) == 0:
        raise CxrError(f"no images in the {split!r} split of {spec}", run)
    say(f"evaluating {run} on {spec} ({split}: {len(idx)} images)")

    # no quality gate: evaluation measures the model on its labelled split, every image of it
    final = Reader.load(run, device=device, gate=False)
    stage1_dir = run / "stage1"
    models = {"cascade" if stage1_dir.exists() else "final": final}
    if stage1_dir.exists():
        models = {"stage1": Reader.load(stage1_dir, device=device, gate=False), **models}

    cache: dict[tuple[str, str], Outputs] = {}

    def outputs(model: str, name: str) -> Outputs:
        key = (model, name)
        if key not in cache:
            ids = idx if name == split else ed.indices(name, max_images)
            cache[key] = Outputs(models[model], ed, ids, batch_size, beams, progress,
                                 f"{model} {name}")
        return cache[key]

    main_model = list(models)[-1]
    main = outputs(main_model, split)
    y = ed.prep.labels[idx]
    thresholds = dict(run_spec.thresholds)
    auc = M.auc_per_label(y, main.scores, ed.targets)
    auc["reference_wang2017"] = {t: M.reference_for(t, M.WANG2017_AUC) for t in ed.targets}

    bleu: dict = {}
    for model in models:
        bleu[model] = {}
        for name in bleu_splits:
            if len(ed.indices(name, max_images)) == 0:
                continue
            bleu[model][name] = _bleu(outputs(model, name), ed, final.words, beams)

    context = None
    if any(f.side or f.location or f.severity for i in idx for f in ed.truth_findings(i)):
        context = M.context_accuracy(
            (ed.truth_findings(i), [f for f in main.results[k].findings if f.disease != "normal"])
            for k, i in enumerate(idx))
        context["given_disease"] = _context_given_disease(main, ed, beams)

    loc = _localisation(main, ed, progress)
    if loc:
        loc["reference_wang2017_iobb_0.5"] = {
            t: M.reference_for(t, M.WANG2017_IOBB_05)
            for t in loc["protocol_given_disease"]["n"]}

    result = {
        "run": str(run), "model_id": final.model_id, "models": {m: r.model_id for m, r in models.items()},
        "data": spec, "truth": truth, "split": split, "n_images": int(len(idx)),
        "split_counts": {s: int(len(ed.indices(s))) for s in SPLITS},
        "targets": ed.targets,
        "backbone": run_spec.architecture.backbone, "rnn": run_spec.architecture.rnn,
        "cascade": {"refined_labels": len(run_spec.refined.names),
                    "clusters": {t: len(run_spec.refined.children(k))
                                 for k, t in enumerate(ed.targets)}},
        "auc": auc,
        "study": _study(main, ed, y, run_spec.study),
        "detection": _detection(main, ed, y, thresholds),
        "top1_accuracy": _top1(main, y),
        "threshold_rule": run_spec.threshold_rule,
        "calibration": {"method": run_spec.calibration.method,
                        **M.reliability(y, main.scores)},
        "bleu": bleu, "bleu_smoothing": M.BLEU_SMOOTHING,
        "context": context,
        "localisation": loc,
        "beams": beams,
        "seconds": round(time.time() - t0, 1),
    }
    out_dir = Path(out).expanduser() if out else run / "eval"
    write_metrics(result, out_dir)
    say(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'} ({result['seconds']} s)")
    return result


def write_metrics(result: dict, out_dir: Path) -> None:
    write_atomic(out_dir / "metrics.json", json.dumps(result, indent=1, default=_json_default) + "\n")
    write_atomic(out_dir / "metrics.md", metrics_markdown(result))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


# ------------------------------------------------------------------------------ tables
def metric_tables(m: dict) -> list[Table]:
    """The tables of a metrics dict, shared by metrics.md and the HTML report."""
    tables = []
    auc, det = m["auc"], m["detection"]
    st = m.get("study")
    if st:
        from .operating import SIGNAL_WORDS

        rows = [["abnormal probability AUC", st["auc"]], ["threshold", st["threshold"]],
                ["sensitivity (abnormal studies called abnormal)", st["sensitivity"]],
                ["specificity (normal studies called normal)", st["specificity"]],
                ["PPV", st["ppv"]], ["NPV", st["npv"]], ["normal recall", st["normal_recall"]],
                ["studies abnormal / normal", f"{st['abnormal']} / {st['normal']}"]]
        if st.get("best_specificity_at_target") is not None:
            rows.append(["best specificity any threshold gives at the target sensitivity, on this split",
                         st["best_specificity_at_target"]])
        val = st.get("validation") or {}
        tables.append(Table(
            f"Study level: normal or abnormal ({m['split']} split, operating point {st['operating_point']})",
            ["measure", "value"], rows,
            f"abnormal = the study has any finding; its probability is the calibrated "
            f"{SIGNAL_WORDS.get(st['signal'], st['signal'])}; "
            f"the threshold was chosen on the validation patients for {st['operating_point']} "
            f"(there: sensitivity {M.fmt(val.get('sensitivity'))}, specificity "
            f"{M.fmt(val.get('specificity'))}). Findings are reported only in studies called abnormal."))
    rows = []
    for t in m["targets"]:
        d = det["per_label"].get(t, {})
        rows.append([t, auc["positives"].get(t), auc["per_label"].get(t),
                     auc["reference_wang2017"].get(t), det["thresholds"].get(t),
                     d.get("precision"), d.get("recall"), d.get("specificity"), d.get("f1")])
    rows.append(["mean / micro", sum(auc["positives"].values()), auc["mean"], None, None,
                 det["micro"]["precision"], det["micro"]["recall"], None, det["micro"]["f1"]])
    skipped = "; ".join(f"{k}: {v}" for k, v in auc["skipped"].items())
    tables.append(Table(
        f"Detection ({m['split']} split, {m['n_images']} images)",
        ["target", "positives", "AUC", "Wang 2017 AUC", "threshold", "PPV", "sensitivity", "specificity", "F1"],
        rows,
        "AUC of the calibrated scores; mean over targets with both classes present"
        + (f" (no AUC for {skipped})" if skipped else "")
        + (f"; top-1 accuracy {M.fmt(m['top1_accuracy'])}" if m.get("top1_accuracy") is not None else "")
        + f". PPV (precision), sensitivity (recall), specificity, F1 of the reported findings at the "
        f"stored operating thresholds ({m.get('threshold_rule') or 'stored'})."
        " Wang et al. 2017 figures are on ChestX-ray8 (108,948 real images), not this data."))
    rows = []
    for model, per_split in m["bleu"].items():
        for split, b in per_split.items():
            for kind in ("given_disease", "end_to_end"):
                v = b[kind]
                rows.append([model, split, kind.replace("_", " "), v.get("n")]
                            + [v.get(f"bleu{n}") for n in range(1, 5)])
    if rows:
        tables.append(Table(
            "Annotation BLEU before (stage1) and after the cascade", 
            ["model", "split", "how", "sequences", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], rows,
            "given disease: the RNN writes each true finding's sequence, conditioned on its disease "
            "(the annotator alone); end to end: each detected finding's sequence against all true "
            "sequences of its image. Tokens are MeSH term parts. " + m.get("bleu_smoothing", "")))
    ctx = m.get("context")
    if ctx:
        given = ctx.get("given_disease") or {"fields": {}}
        rows = [[f, v["accuracy"], v["n"], (given["fields"].get(f) or {}).get("accuracy"),
                 (given["fields"].get(f) or {}).get("n")] for f, v in ctx["fields"].items()]
        rows += [["all three fields", ctx["exact"], ctx["n_matched"], given.get("exact"), given.get("n_matched")],
                 ["true findings detected", ctx["detected"], ctx["n_true"], None, None]]
        tables.append(Table(
            "Context of the findings: detected, and given the disease",
            ["field", "detected findings: accuracy", "n", "given the disease: accuracy", "n"], rows,
            "A true finding is paired with a detected finding of the same disease; a field is "
            "scored where the truth states it. Given the disease: the words the annotator writes "
            "when told each true finding's disease, so every true finding is read, whatever the "
            "detector found (two runs compare on the same findings)."))
    loc = m.get("localisation")
    if loc:
        own = BOX_SOURCE_TITLES.get(loc.get("reader_box_source", ""), "")  # the run's stored map
        for key, title in (("protocol_given_disease", "CAM of the true disease (ChestX-ray8 protocol)"),
                           ("reader_output", "boxes the Reader outputs (detected findings only"
                                             + (f"; from the {own}" if own else "") + ")")):
            la = loc[key]
            ths = [str(t) for t in la["thresholds"]]
            for measure in (("iobb", "iou") if key == "protocol_given_disease" else ("iobb",)):
                rows = []
                for label, n in la["n"].items():
                    row = [label, n] + [la[measure]["accuracy"][label][t] for t in ths]
                    if measure == "iobb" and key == "protocol_given_disease":
                        row.append(loc["reference_wang2017_iobb_0.5"].get(label))
                    rows.append(row)
                rows.append(["mean", sum(la["n"].values())] + [la[measure]["mean"][t] for t in ths]
                            + ([None] if measure == "iobb" and key == "protocol_given_disease" else []))
                name = {"iobb": "IoBB", "iou": "IoU"}[measure]
                DEFINITION = {"iobb": "IoBB = overlap / predicted box area.",
                              "iou": "IoU = overlap / area of the union of the two boxes."}
                headers = ["label", "images"] + [f"T({name})={t}" for t in ths]
                if measure == "iobb" and key == "protocol_given_disease":
                    headers.append("Wang 2017 @0.5")
                tables.append(Table(f"Localisation accuracy by {name}: {title}",
                                    headers, rows,
                                    "Share of (image, label) pairs with a true box where some "
                                    "predicted box of that label overlaps a true box by more "
                                    f"than T. {DEFINITION[measure]}"))
        for src, la in (loc.get("sources") or {}).items():
            if src == "cam":  # the protocol tables above
                continue
            ths = [str(t) for t in la["thresholds"]]
            rows = [[label, n] + [la["iobb"]["accuracy"][label][t] for t in ths]
                    + [la["iou"]["accuracy"][label][t] for t in ths] for label, n in la["n"].items()]
            rows.append(["mean", sum(la["n"].values())] + [la["iobb"]["mean"][t] for t in ths]
                        + [la["iou"]["mean"][t] for t in ths])
            tables.append(Table(
                f"Localisation accuracy: {SOURCE_TITLES.get(src, src)}",
                ["label", "images"] + [f"T(IoBB)={t}" for t in ths] + [f"T(IoU)={t}" for t in ths],
                rows, "The true disease's map of this source, thresholded into boxes as the CAM "
                "is; scored as the CAM table. No box was used in training."))
        if loc.get("sources"):
            rows = [[SOURCE_TITLES.get(src, src), la["iobb"]["mean"]["0.5"], la["iou"]["mean"]["0.5"]]
                    for src, la in loc["sources"].items()]
            tables.append(Table("Localisation by source (mean over labels, T = 0.5)",
                                ["source", "T(IoBB)=0.5", "T(IoU)=0.5"], rows,
                                f"Best source by T(IoBB)=0.5: {loc.get('best_source')}."))
    cal = m["calibration"]
    rows = [[f"{b['lo']:.2f}-{b['hi']:.2f}", b["count"], b["confidence"], b["frequency"]]
            for b in cal["bins"] if b["count"]]
    tables.append(Table(
        f"Calibration: ECE {M.fmt(cal['ece'])} ({cal['n']} scores)",
        ["score bin", "scores", "mean score", "share positive"], rows,
        f"{cal.get('method') or ''} calibration fitted on the validation split; ECE over "
        f"{cal['n_bins']} equal-width bins of all (image, target) scores."))
    return tables


def metrics_markdown(m: dict) -> str:
    head = [f"# Evaluation of `{m['run']}`", "",
            f"- data: `{m['data']}`, split `{m['split']}` ({m['n_images']} images; "
            f"train/val/test {m['split_counts']['train']}/{m['split_counts']['val']}/"
            f"{m['split_counts']['test']})",
            f"- model: `{m['model_id']}` ({m['backbone']} + {m['rnn']}; "
            f"{m['cascade']['refined_labels']} refined labels over {len(m['targets'])} targets)",
            f"- mean AUC {M.fmt(m['auc']['mean'])}, ECE {M.fmt(m['calibration']['ece'])}"
            + (f"; study level at {m['study']['operating_point']}: sensitivity {M.fmt(m['study']['sensitivity'])}, "
               f"specificity {M.fmt(m['study']['specificity'])}, AUC {M.fmt(m['study']['auc'])}"
               if m.get("study") else ""), ""]
    body = []
    for t in metric_tables(m):
        body += [f"## {t.title}", "", M.markdown_table(t.headers, t.rows, t.digits), ""]
        if t.note:
            body += [t.note, ""]
    return "\n".join(head + body).rstrip() + "\n"
